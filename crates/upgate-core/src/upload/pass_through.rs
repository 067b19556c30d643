//! Pass-through delivery: a sync upload handed to a streaming provider while it arrives.
//!
//! What flows through here: the body's pieces, teed by intake (each piece is spooled first,
//! then sent here) into a bounded channel that a provider's `put_stream` reads on a blocking
//! thread (through the plugin ABI's host read callback). The end of the body is only
//! released once the upload is accepted (size, content check, sha256, quota, the
//! `delivering` record): until then the provider cannot complete its upstream request. Any
//! refusal, a client that stalls or leaves, or the request being dropped drops the sender,
//! which the provider reads as the host's abort; an upload a provider stored anyway is
//! deleted upstream. A streaming attempt that fails is retried from the spooled copy by
//! `deliver`, exactly as a stored upload.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use upgate_plugin_api::{DeleteRequest, ErrorKind, PluginError, PutResult, StreamRequest};

use crate::plugins::{BodyRead, BodySource, Provider};

use super::plugin_call::{PendingCall, delete_of, delete_unclaimed, forget_stored};
use super::{Gateway, Metadata};

/// Pieces in flight between intake and the provider (each up to one multipart chunk).
const CHANNEL_PIECES: usize = 8;

/// What intake sends.
enum Piece {
    Data(Bytes),
    /// The upload is accepted; its final metadata as JSON.
    End(Vec<u8>),
}

/// The provider's side of the channel, read on its blocking thread.
struct ChannelBody {
    pieces: mpsc::Receiver<Piece>,
    current: Bytes,
    /// The final metadata once the end arrived.
    ended: Option<Vec<u8>>,
    aborted: bool,
}

impl ChannelBody {
    /// What one receive gave: bytes, the end, or (`None`: the sender went without an end:
    /// refused, stalled, gone) the abort.
    fn take(&mut self, piece: Option<Piece>) {
        match piece {
            Some(Piece::Data(bytes)) => self.current = bytes,
            Some(Piece::End(metadata)) => self.ended = Some(metadata),
            None => self.aborted = true,
        }
    }
}

impl BodySource for ChannelBody {
    fn read(&mut self, buffer: &mut [u8]) -> BodyRead {
        while self.current.is_empty() {
            if self.ended.is_some() {
                return BodyRead::End;
            }
            if self.aborted {
                return BodyRead::Aborted;
            }
            let piece = self.pieces.blocking_recv();
            self.take(piece);
        }
        // Fills the buffer with what has already arrived (without waiting for more): fewer,
        // larger writes upstream than one per piece.
        let mut filled = 0;
        loop {
            let take = self.current.len().min(buffer.len() - filled);
            buffer[filled..filled + take].copy_from_slice(&self.current.split_to(take));
            filled += take;
            if filled == buffer.len() || !self.current.is_empty() {
                break;
            }
            match self.pieces.try_recv() {
                Err(mpsc::error::TryRecvError::Empty) => break,
                Ok(piece) => self.take(Some(piece)),
                Err(mpsc::error::TryRecvError::Disconnected) => self.take(None),
            }
            if self.current.is_empty() {
                break;
            }
        }
        BodyRead::Data(filled)
    }

    fn metadata(&self) -> &[u8] {
        self.ended.as_deref().unwrap_or_default()
    }
}

/// A streaming delivery attempt in flight: the sending side and the plugin call.
pub(crate) struct PassThrough {
    pieces: Option<mpsc::Sender<Piece>>,
    call: PendingCall<PutResult>,
    started: Instant,
    /// How long a send may wait for the provider to take a piece before it is given up.
    stall: Duration,
    /// The provider did not take a piece in time and was given up.
    stalled: bool,
}

impl PassThrough {
    /// Starts `put_stream` on a blocking thread when a delivery slot is free now, within the
    /// streams' share of them (else `None`: the upload is stored, then delivered, as without
    /// streaming).
    pub(crate) fn start(
        gateway: &Gateway,
        provider: &Arc<Provider>,
        request: StreamRequest,
        stall: Duration,
    ) -> Option<Self> {
        let share = gateway.streaming_slots.clone().try_acquire_owned().ok()?;
        let slot = gateway.delivery_slots.clone().try_acquire_owned().ok()?;
        let (sender, receiver) = mpsc::channel(CHANNEL_PIECES);
        let delete = delete_of(&request.upload_id, &request.dialect, &request.metadata);
        let unclaimed = delete_unclaimed(provider, delete.clone());
        let stream = move |provider: &Provider| {
            // Held, like the slot, until the plugin returns.
            let _share = share;
            let mut body = ChannelBody {
                pieces: receiver,
                current: Bytes::new(),
                ended: None,
                aborted: false,
            };
            let result = provider.put_stream(&request, &mut body);
            if body.ended.is_none()
                && let Ok(stored) = result
            {
                // Stored before the body's end was released: the host aborted it and the
                // plugin did not stop, or the plugin did not read to the end. Either way it
                // must not stay upstream, and the spooled copy is delivered instead.
                forget_stored(
                    provider,
                    DeleteRequest {
                        remote_id: stored.remote_id,
                        ..delete
                    },
                );
                return Err(PluginError::new(
                    ErrorKind::Unavailable,
                    "the plugin stored the upload before its body ended (deleted upstream)",
                ));
            }
            result
        };
        let call = PendingCall::spawn(provider, slot, stream, Some(unclaimed));
        Some(Self {
            pieces: Some(sender),
            call,
            started: Instant::now(),
            stall,
            stalled: false,
        })
    }

    /// When the plugin call began.
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// Whether the provider still takes bytes.
    pub(crate) fn is_open(&self) -> bool {
        self.pieces.is_some()
    }

    /// Hands a piece (already spooled) to the provider. A provider that stopped reading, or
    /// that takes longer than the stall bound, is given up: its attempt fails (it reads an
    /// abort) and the upload is delivered from the spool after the body.
    pub(crate) async fn send(&mut self, bytes: Bytes) {
        let Some(pieces) = &self.pieces else { return };
        match tokio::time::timeout(self.stall, pieces.send(Piece::Data(bytes))).await {
            Ok(Ok(())) => {}
            // The provider returned (its call failed): its error is the attempt's.
            Ok(Err(_)) => self.pieces = None,
            Err(_) => {
                self.pieces = None;
                self.stalled = true;
            }
        }
    }

    /// The upload is accepted: releases the end of the body with the final `metadata` and
    /// waits (at most `limit`) for the provider's answer.
    pub(crate) async fn finish(
        mut self,
        metadata: &Metadata,
        limit: Duration,
    ) -> Result<PutResult, PluginError> {
        // The attempt's deadline counts from here, the wait to hand over the end included.
        let now = tokio::time::Instant::now();
        let deadline = now + limit;
        let end = Piece::End(serde_json::to_vec(metadata).unwrap_or_default());
        if let Some(pieces) = self.pieces.take()
            && tokio::time::timeout_at(deadline.min(now + self.stall), pieces.send(end))
                .await
                .is_err()
        {
            self.stalled = true;
        }
        if self.stalled {
            // The upstream did not take the bytes as fast as the client sent them: retried
            // from the spool now. The plugin reads the abort once its upstream write returns,
            // and what it stored after all is deleted.
            return Err(PluginError::new(
                ErrorKind::Timeout,
                "the upstream stopped taking the streamed bytes",
            ));
        }
        self.call.wait_until(deadline).await
    }
}
