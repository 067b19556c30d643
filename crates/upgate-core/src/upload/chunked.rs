//! Chunked upload sessions: chunks in the spool, session rows in the store, and the sweep.
//!
//! What flows through here: a dialect's declared upload (name, size, number of chunks),
//! checked against the tenant's plan and recorded as a session row that expires after
//! `server.session_expiry`; chunks of that session, streamed through a [`SpoolWriter`] into a
//! temporary spool file (the running total of the session checked against the declared size
//! and the plan's limit as the bytes arrive), then placed in the spool as chunk `<number>` of
//! session `<id>` (ids are upgate's uuids, numbers are integers: nothing from a client
//! becomes a path), their sizes recorded in the store so a restart, even a SIGKILL between
//! two chunks, loses nothing; at completion the chunks streamed in order through one
//! [`SpoolWriter`] into an ordinary spooled upload, handed to [`Gateway::accept`] like any
//! single upload. [`Gateway::sweep_sessions`] deletes expired sessions and their chunks,
//! and what a crash left behind.
//!
//! Everything that touches one session's chunks (a chunk's commit, completion, sweeping) holds
//! that session (see `hold.rs`: this process's lock, and with a shared store its lease), so a
//! re-sent chunk, a completion and the sweeper never interleave, on one node or several.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actix_multipart::Field;
use actix_web::http::header::HeaderMap;
use actix_web::web::Payload;
use tokio::io::AsyncReadExt;

use crate::content;
use crate::error::{ApiError, Throttle};
use crate::spool::{Spool, SpoolWriter, SpooledFile};
use crate::store::{SessionRecord, Store, UploadRecord};
use crate::vocab::{DialectName, is_uuid, now_ms};

use super::admit::Admission;
use super::hold::{holding, try_lock_session};
use super::intake::{self, next_or_stall, validate_filename};
use super::running_hash::RunningHash;
use super::{Gateway, Metadata, Noted};
use in_place::{InPlaceWriter, Layout};
use sha2::Sha256;

/// Most chunks one session may declare (a chunk request reads every chunk row of its
/// session: tiny chunks by the hundred thousand made each one cost seconds).
pub(crate) use crate::store::MAX_SESSION_CHUNKS as MAX_CHUNKS;
/// `Retry-After` of a session refused for the tenant's `max_open_sessions`.
const OPEN_SESSIONS_RETRY_AFTER_SECS: u64 = 60;
/// Bytes read from a chunk file at a time when assembling.
const READ_SLICE: usize = 256 * 1024;
/// Room for the multipart framing around a chunk.
const FRAMING: u64 = 1 << 20;
/// Spool names of chunks on their way into a session directory.
const CHUNK_TEMP_PREFIX: &str = "chunk-";
/// A temporary chunk this old was left behind by a crash.
const STALE_CHUNK_TEMP: Duration = Duration::from_secs(3600);

/// What a dialect declares when it opens a session.
#[derive(Debug, Clone)]
pub(crate) struct NewSession {
    /// The client's filename (metadata only; checked like any filename).
    pub filename: String,
    /// Lower-case extension, checked against the plan's allowlist.
    pub extension: String,
    /// The size of the whole file, checked against the plan's limit.
    pub declared_size: u64,
    /// Chunks are numbered `0..total_chunks`.
    pub total_chunks: u64,
    pub metadata: Metadata,
}

/// The names of a chunk request's multipart parts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkForm {
    /// The part carrying the chunk's bytes.
    pub file_field: &'static str,
    /// The text field carrying the chunk number.
    pub number_field: &'static str,
}

/// A chunk spooled but not yet in its session: removed when dropped, unless kept.
struct TempChunk {
    path: PathBuf,
    size: u64,
    /// Written in the session's in-place file at this offset (`path` is that file, never
    /// removed).
    in_place: Option<u64>,
    /// The session's one in-place writer, for a chunk in place: held until the chunk is
    /// recorded, so that no other request lays the prefix out from a session without it.
    writer: Option<InPlaceWriter>,
    /// The sha256 state of the in-place prefix with this chunk, when it was hashed on from
    /// the prefix's state.
    running: Option<Sha256>,
}

impl TempChunk {
    fn keep(mut self) -> PathBuf {
        std::mem::take(&mut self.path)
    }
}

impl Drop for TempChunk {
    fn drop(&mut self) {
        if self.in_place.is_some() || self.path.as_os_str().is_empty() {
            return;
        }
        // Up to a whole chunk to free: off the async worker where there is one.
        let path = std::mem::take(&mut self.path);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || std::fs::remove_file(path))),
            Err(_) => {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// The most bytes a session's file may hold: its declared size, within the plan's limit
/// (which a reload may have lowered since the session started).
fn session_limit(session: &SessionRecord, admission: &Admission) -> u64 {
    session.declared_size.min(admission.tenant.plan.max_file_size())
}

/// Chunk numbers of `0..total_chunks` not received yet.
pub(crate) fn missing_chunks(session: &SessionRecord) -> Vec<u64> {
    let present: HashSet<u64> = session.chunks.iter().map(|(number, _)| *number).collect();
    (0..session.total_chunks)
        .filter(|number| !present.contains(number))
        .collect()
}

/// Cuts session `id`'s in-place file at `offset`, where its prefix now ends: the bytes after
/// it were moved into files of their own, and would otherwise hold the disk a second time
/// until the session ends. Taken under the file's lock (an abandoned writer is waited for);
/// the caller holds the session's in-place writer. A spool without in-place files has
/// nothing to cut.
fn cut_in_place(spool: &dyn Spool, id: &str, offset: u64) -> std::io::Result<()> {
    spool.open_in_place(id, offset).map(drop)
}

fn size_mismatch(held: u64, declared: u64) -> ApiError {
    ApiError::Malformed(format!(
        "the chunks hold {held} bytes, but the session declared {declared}"
    ))
}

impl Gateway {
    /// Opens a chunked upload session for the admitted tenant (no bytes yet).
    pub(crate) async fn start_session(
        &self,
        admission: &Admission,
        new: NewSession,
    ) -> Result<SessionRecord, ApiError> {
        self.check_disk_floor()?;
        validate_filename(&new.filename)?;
        let plan = &admission.tenant.plan;
        plan.check_extension(&new.extension)?;
        plan.check_size(new.declared_size)?;
        if !(1..=MAX_CHUNKS).contains(&new.total_chunks) {
            return Err(ApiError::Malformed(format!(
                "a session has 1 to {MAX_CHUNKS} chunks"
            )));
        }
        let now = now_ms();
        let expiry = admission.policy.config.server.session_expiry.0;
        let session = SessionRecord {
            id: uuid::Uuid::new_v4().to_string(),
            tenant: admission.tenant.name.clone(),
            dialect: admission.dialect,
            filename: new.filename,
            extension: new.extension,
            declared_size: new.declared_size,
            total_chunks: new.total_chunks,
            metadata: new.metadata,
            created_at_ms: now,
            expires_at_ms: now.saturating_add(expiry.as_millis().min(i64::MAX as u128) as i64),
            chunks: Vec::new(),
            length_deferred: false,
            concat: None,
            upload_id: None,
        };
        self.insert_open_session(admission, session.clone()).await?;
        tracing::info!(session_id = %session.id, tenant = %session.tenant, chunks = session.total_chunks,
            size = session.declared_size, "upload session started");
        Ok(session)
    }

    /// Records a new `session`, unless its tenant holds its plan's `max_open_sessions`: 429
    /// with `Retry-After: 60` (a session ends when it completes, is terminated or expires).
    /// The bytes of an unfinished session count towards no quota, so without this cap one
    /// tenant's sessions could fill the disk for every tenant until they expire. Count and
    /// insert run one start at a time on this node, so concurrent starts cannot all pass one
    /// count (nodes sharing a store may still each pass it once at the same moment).
    pub(crate) async fn insert_open_session(
        &self,
        admission: &Admission,
        session: SessionRecord,
    ) -> Result<(), ApiError> {
        let _one_at_a_time = self.session_starts.lock().await;
        let open = self.store.open_sessions_of(admission.tenant.name.clone()).await?;
        if open >= admission.tenant.plan.max_open_sessions() {
            return Err(ApiError::Throttled {
                retry_after_secs: OPEN_SESSIONS_RETRY_AFTER_SECS,
                why: Throttle::Concurrency,
            });
        }
        self.store.insert_session(session).await?;
        Ok(())
    }

    /// The admitted tenant's open session `id` of `dialect`: 404 for a malformed id, an
    /// unknown or swept session or another tenant's; 410 for one expired but not swept yet.
    pub(crate) async fn open_session(
        &self,
        admission: &Admission,
        id: &str,
    ) -> Result<SessionRecord, ApiError> {
        if !is_uuid(id) {
            return Err(ApiError::NotFound);
        }
        find_session(self.store.as_ref(), &admission.tenant.name, admission.dialect, id).await
    }

    /// Receives one chunk of session `id` from a multipart body (`form` names its parts) and
    /// stores it, replacing an earlier copy of the same number. Returns the chunk number and
    /// its size.
    pub(crate) async fn receive_chunk(
        &self,
        admission: &Admission,
        id: &str,
        headers: &HeaderMap,
        payload: Payload,
        form: &ChunkForm,
    ) -> Result<(u64, u64), ApiError> {
        self.check_disk_floor()?;
        let session = self.open_session(admission, id).await?;
        let limit = session_limit(&session, admission);
        let stored = session.received_bytes();
        // Until the chunk number is known, the chunk may replace the largest one.
        let largest = session.chunks.iter().map(|(_, size)| *size).max().unwrap_or(0);
        let ceiling = limit.saturating_sub(stored - largest).saturating_add(FRAMING);
        if intake::content_length(headers).is_some_and(|length| length > ceiling) {
            return Err(ApiError::TooLarge { limit });
        }
        let idle = admission.policy.config.server.idle_timeout.0;
        let (payload, overflowed) = intake::bounded_body(payload, ceiling);
        let mut multipart = intake::form_of(headers, payload)?;
        let mut number: Option<u64> = None;
        let mut chunk: Option<TempChunk> = None;
        let mut other_bytes = 0usize;
        let mut parts = 0usize;
        let too_large = |error| match overflowed.get() {
            true => ApiError::TooLarge { limit },
            false => error,
        };
        while let Some(mut field) = intake::next_part(&mut multipart, idle, &mut parts)
            .await
            .map_err(too_large)?
        {
            let name = field.name().map(str::to_owned);
            match name.as_deref() {
                Some(name) if name == form.number_field => {
                    if number.is_some() {
                        return Err(ApiError::InvalidField {
                            field: form.number_field,
                            message: "is given twice".into(),
                        });
                    }
                    let text = intake::read_text(&mut field, idle, &mut other_bytes)
                        .await
                        .map_err(too_large)?;
                    let parsed = text
                        .trim()
                        .parse::<u64>()
                        .ok()
                        .filter(|n| *n < session.total_chunks)
                        .ok_or_else(|| ApiError::InvalidField {
                            field: form.number_field,
                            message: format!(
                                "`{}` is not a chunk number of this session (0 to {})",
                                text.trim().chars().take(24).collect::<String>(),
                                session.total_chunks - 1
                            ),
                        })?;
                    number = Some(parsed);
                }
                Some(name) if name == form.file_field => {
                    if chunk.is_some() {
                        return Err(ApiError::TooManyFiles { max: 1 });
                    }
                    let others = match number {
                        Some(number) => stored - session.chunk_size(number),
                        None => stored - largest,
                    };
                    let room = limit.saturating_sub(others);
                    // The next chunk of the in-place prefix, not received yet, goes in place.
                    let in_place = match number {
                        Some(number) if !session.chunks.iter().any(|(n, _)| *n == number) => {
                            self.in_place_target(admission, id, number).await
                        }
                        _ => None,
                    };
                    let spooled = self.spool_chunk(&mut field, room, limit, idle, in_place).await;
                    chunk = Some(spooled.map_err(too_large)?);
                }
                _ => intake::drain(&mut field, idle, &mut other_bytes)
                    .await
                    .map_err(too_large)?,
            }
        }
        let number = number.ok_or(ApiError::MissingField(form.number_field))?;
        let chunk = chunk.ok_or(ApiError::NoFile)?;
        let size = chunk.size;
        // The commit runs in a task of its own: a client that goes away mid-commit cannot
        // leave the chunk file and its row disagreeing.
        let commit = ChunkCommit {
            store: self.store.clone(),
            spool: self.spool.clone(),
            tenant: admission.tenant.name.clone(),
            dialect: admission.dialect,
            id: session.id.clone(),
            number,
            chunk,
            limit,
        };
        tokio::spawn(commit.run()).await??;
        Ok((number, size))
    }

    /// Where chunk `number` of `session` goes if it can go in place: the in-place file open
    /// at the prefix's end, with the session's in-place writer; `None` when it is not the
    /// prefix's next chunk, another request writes in place, or the spool keeps chunks apart.
    async fn in_place_target(
        &self,
        admission: &Admission,
        id: &str,
        number: u64,
    ) -> Option<(std::fs::File, PathBuf, u64, InPlaceWriter)> {
        let writer = InPlaceWriter::try_take(id)?;
        // Read again with the writer held: the session read when the request began may lack
        // a chunk that another writer's commit recorded since (its bytes in the prefix).
        let session = self.open_session(admission, id).await.ok()?;
        if session.chunks.iter().any(|(n, _)| *n == number) {
            return None;
        }
        let spool = self.spool.clone();
        let opened = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let layout = Layout::read(spool.as_ref(), &session)?;
            if layout.in_place != number {
                return Ok(None);
            }
            Ok(spool
                .open_in_place(&session.id, layout.offset)?
                .map(|(file, path)| (file, path, layout.offset)))
        })
        .await;
        match opened {
            Ok(Ok(Some((file, path, offset)))) => Some((file, path, offset, writer)),
            Ok(Ok(None)) | Err(_) => None,
            Ok(Err(error)) => {
                tracing::warn!(%error, "cannot open a session's in-place file; the chunk is kept apart");
                None
            }
        }
    }

    async fn spool_chunk(
        &self,
        field: &mut Field,
        room: u64,
        limit: u64,
        idle: Duration,
        in_place: Option<(std::fs::File, PathBuf, u64, InPlaceWriter)>,
    ) -> Result<TempChunk, ApiError> {
        let mut continuing = false;
        let (mut writer, at) = match in_place {
            Some((file, path, offset, holder)) => {
                let state = RunningHash::at(holder.session(), offset);
                continuing = state.is_some();
                (
                    SpoolWriter::in_place(
                        &self.spool,
                        &self.intake_budget,
                        file,
                        path,
                        room,
                        state.unwrap_or_default(),
                    ),
                    Some((offset, holder)),
                )
            }
            None => {
                let temp_id = format!("{CHUNK_TEMP_PREFIX}{}", uuid::Uuid::new_v4());
                (
                    SpoolWriter::new(&self.spool, &self.intake_budget, &temp_id, room, false),
                    None,
                )
            }
        };
        while let Some(bytes) = next_or_stall(field, idle).await? {
            let bytes = bytes.map_err(intake::multipart_error)?;
            writer.write(&bytes).await.map_err(|error| match error {
                // The writer knows only the room left; the client is told the session's limit.
                ApiError::TooLarge { .. } => ApiError::TooLarge { limit },
                other => other,
            })?;
        }
        let (path, size, state, ..) = writer.finish_open().await?;
        Ok(TempChunk {
            path,
            size,
            running: (continuing && at.is_some()).then_some(state),
            in_place: at.as_ref().map(|(offset, _)| *offset),
            writer: at.map(|(_, writer)| writer),
        })
    }

    /// Assembles session `id` (every chunk present, their total the declared size) into one
    /// upload, accepts it like a single upload (quota, record, delivery), then removes the
    /// session and its chunks. Missing chunks: 400 naming them, and the session stays open.
    pub(crate) async fn complete_session(
        self: &Arc<Self>,
        admission: Admission,
        id: &str,
    ) -> Result<Vec<UploadRecord>, ApiError> {
        if !is_uuid(id) {
            return Err(ApiError::NotFound);
        }
        self.check_disk_floor()?;
        // In a task of its own: a client that goes away cannot stop a completion between
        // the upload's record and the session's removal (a retried `complete` would make a
        // second upload of it), nor leave the chunks half moved out of place.
        let (gateway, id) = (self.clone(), id.to_owned());
        tokio::spawn(async move {
            holding(
                &gateway.store,
                &id,
                async { gateway.open_session(&admission, &id).await.map(drop) },
                gateway.complete_held_session(&admission, &id),
            )
            .await
        })
        .await
        .map_err(|_| ApiError::Internal)?
    }

    /// [`Gateway::complete_session`], the session held.
    async fn complete_held_session(
        &self,
        admission: &Admission,
        id: &str,
    ) -> Result<Vec<UploadRecord>, ApiError> {
        let dialect = admission.dialect;
        let session = self.open_session(admission, id).await?;
        // Recorded by an earlier attempt that stopped before removing the session (a crash
        // between the two): that upload is the answer, not a second one.
        // (A failed one is made again: a Kore session's chunks stay until one succeeds.)
        match self.noted_upload(&admission.tenant.name, &session).await? {
            Noted::Made(record) => {
                self.close_completed_session(id, &record.id).await;
                return Ok(vec![*record]);
            }
            Noted::Running => return Err(ApiError::SessionBusy),
            Noted::Unmade | Noted::Failed => {}
        }
        let missing = missing_chunks(&session);
        if !missing.is_empty() {
            return Err(ApiError::MissingChunks(missing));
        }
        let plan = &admission.tenant.plan;
        plan.check_extension(&session.extension)?;
        plan.check_size(session.declared_size)?;
        if session.received_bytes() != session.declared_size {
            return Err(size_mismatch(session.received_bytes(), session.declared_size));
        }
        // The upload's id is noted in the session before anything is recorded (and taken back
        // when this attempt fails), so that a retry after a crash finds it.
        let upload_id = dialect.new_upload_id();
        let completion = self.complete_as(admission, &session, upload_id.clone());
        let records = self.noting(id, &upload_id, completion).await?;
        self.close_completed_session(id, &records[0].id).await;
        Ok(records)
    }

    /// Completes the held `session` as upload `upload_id`: lays its chunks out, checks and
    /// records the file (and delivers it, with sync delivery).
    async fn complete_as(
        &self,
        admission: &Admission,
        session: &SessionRecord,
        upload_id: String,
    ) -> Result<Vec<UploadRecord>, ApiError> {
        let id = session.id.as_str();
        let plan = &admission.tenant.plan;
        let spool = self.spool.clone();
        let held = session.clone();
        let layout = tokio::task::spawn_blocking(move || -> std::io::Result<Layout> {
            let layout = Layout::read(spool.as_ref(), &held)?;
            if layout.in_place == held.total_chunks {
                return Ok(layout);
            }
            // Some in place, some apart: the prefix's chunks get files of their own too, and
            // the session is assembled from them all.
            for number in 0..layout.in_place {
                let size = held.chunk_size(number);
                spool.move_out_of_place(&held.id, number, Layout::offset_of(&held, number), size)?;
            }
            Ok(Layout {
                in_place: 0,
                offset: 0,
            })
        })
        .await?
        .inspect_err(
            |error| tracing::error!(session_id = %id, %error, "cannot lay out a session's chunks"),
        )?;
        let file = if layout.in_place == session.total_chunks {
            // Every chunk in place, in order: that file is the upload; it is read once, for
            // its digest, and linked into the spool.
            let (spool, session_id, name) = (self.spool.clone(), id.to_owned(), upload_id.clone());
            let (len, text) = (
                session.declared_size,
                content::is_text_extension(&session.extension),
            );
            let hashed = RunningHash::sha256_of(id, len).filter(|_| !text);
            let (path, digest) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                let path = spool.link_in_place(&session_id, len, &name)?;
                // Hashed as the chunks arrived; a text file is read whole for its UTF-8.
                let digest = match hashed {
                    Some(sha256) => crate::spool::digest_hashed(&path, sha256),
                    None => crate::spool::digest(&path, text),
                };
                if digest.is_err() {
                    let _ = std::fs::remove_file(&path);
                }
                Ok((path, digest?))
            })
            .await??;
            intake::received_file(
                path,
                digest,
                upload_id,
                session.filename.clone(),
                session.extension.clone(),
                plan.config.verify_content,
            )
            .await?
        } else {
            self.assemble(admission, session, upload_id).await?
        };
        self.accept(admission, vec![file.into()], session.metadata.clone())
            .await
    }

    /// Removes a session whose upload `upload_id` is recorded, with its files.
    async fn close_completed_session(&self, id: &str, upload_id: &str) {
        if let Err(error) = self.store.delete_session(id.to_owned()).await {
            // The upload is recorded; the sweeper removes the session when it expires.
            tracing::error!(session_id = %id, %error, "cannot delete a completed session");
        }
        self.remove_session_files(id).await;
        tracing::info!(session_id = %id, upload_id = %upload_id, "upload session completed");
    }

    /// Writes the chunks of `session`, each in a file of its own, in order into one spooled
    /// upload `upload_id`.
    async fn assemble(
        &self,
        admission: &Admission,
        session: &SessionRecord,
        upload_id: String,
    ) -> Result<SpooledFile, ApiError> {
        let mut writer = SpoolWriter::new(
            &self.spool,
            &self.intake_budget,
            &upload_id,
            session_limit(session, admission),
            content::is_text_extension(&session.extension),
        );
        let mut assembled = 0u64;
        let mut buffer = vec![0u8; READ_SLICE];
        for number in 0..session.total_chunks {
            let spool = self.spool.clone();
            let session_id = session.id.clone();
            // A recorded chunk whose bytes are gone (its re-sent copy's commit failed after
            // replacing it) is named missing: the client sends it again.
            let missing = |error: &std::io::Error| {
                tracing::error!(session_id = %session.id, chunk = number, %error, "a recorded chunk is missing");
                (error.kind() == std::io::ErrorKind::NotFound).then(|| ApiError::MissingChunks(vec![number]))
            };
            let size = session.chunk_size(number);
            let chunk = tokio::task::spawn_blocking(move || spool.fetch_chunk(&session_id, number, size))
                .await?
                .map_err(|error| missing(&error).unwrap_or_else(|| error.into()))?;
            let mut file = tokio::fs::File::open(chunk.path())
                .await
                .map_err(|error| missing(&error).unwrap_or(ApiError::Internal))?;
            loop {
                let read = file.read(&mut buffer).await.map_err(|error| {
                    tracing::error!(session_id = %session.id, chunk = number, %error, "cannot read a chunk");
                    ApiError::Internal
                })?;
                if read == 0 {
                    break;
                }
                assembled += read as u64;
                if assembled > session.declared_size {
                    return Err(size_mismatch(assembled, session.declared_size));
                }
                writer.write(&buffer[..read]).await?;
            }
        }
        if assembled != session.declared_size {
            return Err(size_mismatch(assembled, session.declared_size));
        }
        intake::complete_file(
            writer,
            upload_id,
            session.filename.clone(),
            session.extension.clone(),
            admission.tenant.plan.config.verify_content,
        )
        .await
    }
}

async fn find_session(
    store: &dyn Store,
    tenant: &str,
    dialect: DialectName,
    id: &str,
) -> Result<SessionRecord, ApiError> {
    let session = store
        .session_of(tenant.to_owned(), id.to_owned())
        .await?
        .filter(|session| session.dialect == dialect)
        .ok_or(ApiError::NotFound)?;
    if session.expires_at_ms <= now_ms() {
        return Err(ApiError::SessionExpired);
    }
    Ok(session)
}

/// A received chunk on its way into its session.
struct ChunkCommit {
    store: Arc<dyn Store>,
    spool: Arc<dyn Spool>,
    tenant: String,
    dialect: DialectName,
    id: String,
    number: u64,
    chunk: TempChunk,
    /// The session's limit for the sum of its chunks.
    limit: u64,
}

impl ChunkCommit {
    /// Moves the chunk into its session under the session's lock, after checking the running
    /// total again against the session's current chunks.
    async fn run(self) -> Result<(), ApiError> {
        let store = self.store.clone();
        let id = self.id.clone();
        // The session was found the tenant's before its chunk was received.
        holding(&store, &id, std::future::ready(Ok(())), self.run_held()).await
    }

    async fn run_held(self) -> Result<(), ApiError> {
        let Self {
            store,
            spool,
            tenant,
            dialect,
            id,
            number,
            mut chunk,
            limit,
        } = self;
        let session = find_session(store.as_ref(), &tenant, dialect, &id).await?;
        let others: u64 = session
            .chunks
            .iter()
            .filter(|(n, _)| *n != number)
            .map(|(_, size)| size)
            .sum();
        if others.saturating_add(chunk.size) > limit {
            return Err(ApiError::TooLarge { limit });
        }
        let size = chunk.size;
        let running = chunk.running.take();
        // Released when this commit ends, after the chunk is recorded.
        let _writer = chunk.writer.take();
        let placing = spool.clone();
        let current = session.clone();
        // Where the prefix now ends if the chunk stayed in place.
        let in_place_end = tokio::task::spawn_blocking(move || -> std::io::Result<Option<u64>> {
            let layout = Layout::read(placing.as_ref(), &current)?;
            match &chunk.in_place {
                // Still the prefix's next chunk: it is in place already, and a copy of the same
                // number that another request placed apart meanwhile (the prefix stopped at
                // it) goes: this one is recorded last.
                Some(offset) if layout.in_place == number && layout.offset == *offset => {
                    placing.remove_chunk(&current.id, number);
                    return Ok(Some(offset + size));
                }
                // The prefix changed while it arrived: it gets a file of its own, and the
                // in-place file ends where the prefix does (this request holds its writer).
                Some(offset) => {
                    placing.move_out_of_place(&current.id, number, *offset, size)?;
                    cut_in_place(placing.as_ref(), &current.id, layout.offset)?;
                }
                None => {
                    // Replacing a chunk of the prefix: the later ones leave the in-place
                    // file first (their offsets follow from its size).
                    if number < layout.in_place {
                        for later in number + 1..layout.in_place {
                            let size = current.chunk_size(later);
                            let offset = Layout::offset_of(&current, later);
                            placing.move_out_of_place(&current.id, later, offset, size)?;
                        }
                    }
                    placing.place_chunk(&current.id, number, &chunk.path)?;
                    chunk.keep();
                    // What the in-place file held from this chunk on now lives apart: it
                    // goes, unless a request of this process is writing in place (its bytes
                    // are moved out when it commits, and the file cut then).
                    if number < layout.in_place
                        && let Some(_writer) = InPlaceWriter::try_take(&current.id)
                    {
                        cut_in_place(placing.as_ref(), &current.id, Layout::offset_of(&current, number))?;
                    }
                }
            }
            Ok(None)
        })
        .await?
        .inspect_err(
            |error| tracing::error!(session_id = %id, chunk = number, %error, "cannot store a chunk"),
        )?;
        if let Err(error) = store.put_chunk(id.clone(), number, size).await {
            let removing = spool.clone();
            let session_id = id.clone();
            let _ = tokio::task::spawn_blocking(move || removing.remove_chunk(&session_id, number)).await;
            RunningHash::forget(&id);
            // The usual cause: the session was swept or completed meanwhile.
            return match find_session(store.as_ref(), &tenant, dialect, &id).await {
                Ok(_) => Err(error.into()),
                Err(gone) => Err(gone),
            };
        }
        match (in_place_end, running) {
            (Some(end), Some(state)) => RunningHash::advance(&id, end, state),
            // In place without the prefix's state: it is hashed at completion.
            (Some(_), None) => RunningHash::forget(&id),
            // Apart: a new chunk is past the prefix and changes nothing; a re-sent one may
            // have replaced one of its chunks, and the prefix's state is not known then.
            (None, _) => {
                if session.chunks.iter().any(|(n, _)| *n == number) {
                    RunningHash::forget(&id);
                }
            }
        }
        Ok(())
    }
}

impl Gateway {
    /// Sweeps what sessions leave behind: expired sessions and their chunks, chunk
    /// directories whose session row is gone (a completion or sweep interrupted between the
    /// row and the files) and temporary chunks that never reached their session.
    pub(crate) async fn sweep_sessions(&self) {
        match self.store.take_expired_sessions(now_ms()).await {
            Ok(expired) => {
                for id in expired {
                    // A request still holding it (a slow body) is never waited for: its
                    // files are an orphan's once it ends, which a later sweep removes.
                    let Some(_lock) = try_lock_session(&id) else {
                        tracing::info!(session_id = %id, "expired session swept; its files go once its request ends");
                        continue;
                    };
                    self.remove_session_files(&id).await;
                    tracing::info!(session_id = %id, "expired session swept");
                }
            }
            Err(error) => tracing::error!(%error, "session sweep failed"),
        }
        let spool = self.spool.clone();
        let listed = tokio::task::spawn_blocking(move || {
            spool.remove_stale_parts(CHUNK_TEMP_PREFIX, STALE_CHUNK_TEMP);
            spool.sessions()
        })
        .await
        .unwrap_or_default();
        if listed.is_empty() && RunningHash::is_empty() {
            return;
        }
        // Read after listing: chunks are only placed for a session whose row exists, so a
        // listed session without a row now is an orphan for good.
        let Ok(ids) = self.store.session_ids().await else {
            return;
        };
        let ids: HashSet<String> = ids.into_iter().collect();
        RunningHash::retain(|id| ids.contains(id));
        for name in listed.into_iter().filter(|name| !ids.contains(name)) {
            let Some(_lock) = try_lock_session(&name) else {
                continue;
            };
            self.remove_session_files(&name).await;
            tracing::info!(session_id = %name, "orphaned session directory removed");
        }
    }
}

mod in_place;
#[cfg(test)]
mod tests;
