//! Provider plugin `kore`: forwards a stored upload to the Kore.ai agent platform's public
//! files API.
//!
//! Flow: the host hands over a [`PutRequest`] (the spooled file), or, with sync delivery, a
//! [`StreamRequest`] and the upload's [`Body`] while it arrives ([`FLAG_STREAMING`]); auth is
//! `X-api-key: KEY`.
//! - Up to `single_upload_limit` bytes, the file streams (from disk, or as it arrives) as the
//!   `file` part of `POST {base_url}/api/public/files` with `fileContext` → 200 `{fileId, url}`.
//!   An arriving upload is streamed only when it cannot be larger than that limit
//!   ([`StreamRequest::size_at_most`]): otherwise it is declined (`NotStreamed`) and put from
//!   the spool, since a session needs `fileSize` before its first byte.
//! - Larger files go in chunks of `chunk_size` bytes, each read from its byte range of the
//!   spooled file: `POST /api/public/files/session/start` (JSON `{fileContext, totalChunks,
//!   fileExtension, fileName, fileSize}`) → `{sessionId}`; per chunk, `POST
//!   /api/public/files/session/{sessionId}` with `chunkNumber` (0-based) and `file` → the
//!   same `{chunkNumber, sessionId}` back; then `POST .../{sessionId}/complete` → `{fileId,
//!   url}`.
//!
//! `fileId` becomes the remote id and `url` the URL. `fileContext` is the request's
//! `fileContext` metadata, else the `file_context` setting, else `bulkImport`. A failed step
//! fails the put (the host retries the whole upload; a chunk refused with a retryable error
//! is sent again first). Kore has no delete API, so a session stops at the host's deadline
//! ([`PutRequest::deadline_ms`]): no chunk after it, no `complete` within a second of it.
//!
//! Settings: the common upstream keys (see `upgate_upstream::UpstreamSettings`),
//! `file_context`, `single_upload_limit` (bytes or "25MB"; default 25 000 000) and
//! `chunk_size` (default "8MiB").
#![deny(unsafe_code)]

use std::time::Duration;

use serde_json::{Value, json};
use upgate_plugin_api::{
    Body, DeleteRequest, ErrorKind, FLAG_STREAMING, InitContext, PluginError, Provider, PutRequest,
    PutResult, StreamRequest,
};
use upgate_upstream::{
    Auth, Content, FileRange, Multipart, Reply, Upstream, UpstreamSettings, is_path_segment, metadata_value,
    no_delete_api, upload_range,
};

const VENDOR: &str = "kore";
const DEFAULT_SINGLE_UPLOAD_LIMIT: u64 = 25_000_000;
const DEFAULT_CHUNK_SIZE: u64 = 8 << 20;

/// The kore provider.
#[derive(Debug)]
pub struct Kore {
    upstream: Upstream,
    file_context: String,
    single_upload_limit: u64,
    chunk_size: u64,
}

impl Provider for Kore {
    const FLAGS: u32 = FLAG_STREAMING;

    fn init(context: &InitContext, settings: Value) -> Result<Self, PluginError> {
        let settings = UpstreamSettings::parse(
            context,
            settings,
            &["file_context", "single_upload_limit", "chunk_size"],
        )?;
        let file_context = settings.string_or("file_context", "bulkImport")?;
        let single_upload_limit =
            settings.byte_size_or("single_upload_limit", DEFAULT_SINGLE_UPLOAD_LIMIT)?;
        let chunk_size = settings.byte_size_or("chunk_size", DEFAULT_CHUNK_SIZE)?;
        let upstream = Upstream::new(VENDOR, settings, Auth::header("x-api-key"))?;
        Ok(Self {
            upstream,
            file_context,
            single_upload_limit,
            chunk_size,
        })
    }

    fn put(&self, request: PutRequest) -> Result<PutResult, PluginError> {
        if request.size <= self.single_upload_limit {
            return self.put_single(Content::Spooled(&request));
        }
        let file_context = metadata_value(&request.metadata, "fileContext").unwrap_or(&self.file_context);
        self.put_chunked(&request, file_context)?
            .into_put_result("", "fileId", &["url"])
    }

    fn put_stream(&self, request: StreamRequest, body: &mut Body<'_>) -> Result<PutResult, PluginError> {
        if request.size_at_most > self.single_upload_limit {
            return Err(PluginError::new(
                ErrorKind::NotStreamed,
                "may be larger than the single upload limit: a session needs its size first",
            ));
        }
        self.put_single(Content::Arriving(&request, body))
    }

    fn delete(&self, _request: DeleteRequest) -> Result<(), PluginError> {
        Err(no_delete_api(VENDOR))
    }

    fn health(&self) -> Result<(), PluginError> {
        self.upstream.health()
    }
}

impl Kore {
    /// One `POST /api/public/files`; `fileContext` is known by the file's end.
    fn put_single(&self, content: Content<'_, '_>) -> Result<PutResult, PluginError> {
        let default_context = self.file_context.clone();
        let fields = move |metadata: &upgate_upstream::Metadata| {
            let file_context = metadata_value(metadata, "fileContext").unwrap_or(&default_context);
            Ok(vec![("fileContext".to_owned(), file_context.to_owned())])
        };
        self.upstream
            .post_upload("upload", "/api/public/files", &[], content, "file", fields)?
            .into_put_result("", "fileId", &["url"])
    }

    /// The session protocol; returns the `complete` answer.
    fn put_chunked(&self, request: &PutRequest, file_context: &str) -> Result<Reply, PluginError> {
        let whole = upload_range(request)?;
        let total_chunks = whole.len.div_ceil(self.chunk_size);
        let start = json!({
            "fileContext": file_context,
            "totalChunks": total_chunks,
            "fileExtension": request.extension,
            "fileName": request.filename,
            "fileSize": whole.len,
        });
        let started = self.upstream.post_json(
            "session start",
            "/api/public/files/session/start",
            &[],
            &start,
            request.time_left(),
        )?;
        let session_id = started.require_str("sessionId")?;
        if !is_path_segment(session_id) {
            return Err(started.unexpected("`sessionId` is not a plain id"));
        }
        let session_path = format!("/api/public/files/session/{session_id}");

        for number in 0..total_chunks {
            within_deadline(request, &format!("chunk {number}"), Duration::ZERO)?;
            let offset = number * self.chunk_size;
            let len = self.chunk_size.min(whole.len - offset);
            let form = Multipart::new().text("chunkNumber", &number.to_string()).file(
                "file",
                &request.filename,
                &request.mime_type,
                FileRange::range(&whole.path, offset, len),
            );
            let reply = self.send_chunk(number, &session_path, form, request)?;
            let echoed_number = match reply.body.get("chunkNumber") {
                Some(Value::Number(n)) => n.as_u64(),
                Some(Value::String(n)) => n.parse().ok(),
                _ => None,
            };
            if echoed_number != Some(number) || reply.str_field("sessionId") != Some(session_id) {
                return Err(reply.unexpected(&format!(
                    "chunk acknowledgement does not match chunk {number} of session {session_id}"
                )));
            }
        }
        // `complete` makes the file exist upstream, and Kore has no delete API: not started
        // when the host could stop waiting before its answer.
        within_deadline(request, "complete", COMPLETE_MARGIN)?;
        self.upstream
            .post_empty(
                "session complete",
                &format!("{session_path}/complete"),
                &[],
                request.time_left(),
            )
            .map_err(session_gone)
    }

    /// Sends one chunk, again after a failure worth retrying (a chunk may be re-sent: the
    /// last copy wins), so that one refused request does not start the whole file over.
    fn send_chunk(
        &self,
        number: u64,
        session_path: &str,
        form: Multipart,
        request: &PutRequest,
    ) -> Result<Reply, PluginError> {
        let what = format!("chunk {number}");
        let mut attempt = 1;
        loop {
            match self
                .upstream
                .post_multipart(&what, session_path, &[], form.clone(), request.time_left())
            {
                Err(error) if attempt < CHUNK_ATTEMPTS && retryable(&error) => {
                    let wait = error
                        .retry_after_secs
                        .map_or(CHUNK_RETRY_WAIT * attempt, Duration::from_secs)
                        .min(MAX_CHUNK_RETRY_WAIT);
                    std::thread::sleep(wait);
                    attempt += 1;
                }
                sent => return sent.map_err(session_gone),
            }
        }
    }
}

/// Tries of one chunk before the put fails (and the host retries the whole file).
const CHUNK_ATTEMPTS: u32 = 3;
/// The wait before a chunk's next try, times its number, when the upstream names none.
const CHUNK_RETRY_WAIT: Duration = Duration::from_millis(250);
/// The longest wait before a chunk's next try.
const MAX_CHUNK_RETRY_WAIT: Duration = Duration::from_secs(10);

/// The least time left before the host's deadline for a session's `complete` to be sent.
const COMPLETE_MARGIN: Duration = Duration::from_secs(1);

/// A step of a chunked upload is taken only with more than `margin` left before the host
/// stops waiting: after that, nobody would record what it made (the session upstream is
/// left to expire; the host's next attempt starts a new one).
fn within_deadline(request: &PutRequest, step: &str, margin: Duration) -> Result<(), PluginError> {
    match request.time_left() {
        Some(left) if left <= margin => Err(PluginError::new(
            ErrorKind::Timeout,
            format!("kore upload: the host's deadline came before {step}; the session is left to expire"),
        )),
        _ => Ok(()),
    }
}

fn retryable(error: &PluginError) -> bool {
    matches!(error.kind, ErrorKind::Unavailable | ErrorKind::Timeout)
}

/// A session that is gone upstream (404, 410: it expired or was swept) is worth a new one:
/// the host's next attempt starts the upload over instead of failing it for good.
fn session_gone(mut error: PluginError) -> PluginError {
    if matches!(error.status, Some(404 | 410)) {
        error.kind = ErrorKind::Unavailable;
    }
    error
}

upgate_plugin_api::export_provider!(Kore, "kore");
