//! Resumable uploads (tus): one file that grows in place, request after request.
//!
//! What flows through here: a declared upload (its length, or a length deferred until a
//! later request; its name and metadata), kept as a session row of one chunk whose size is
//! the durable offset; then bodies appended at that offset. Each body is counted against
//! the declared length and the plan's limit as it arrives (never past either, a deferred
//! length included), hashed for the client's `Upload-Checksum` if it sent one, written in
//! place in the spool (no assembly copy), made durable per `server.durability`, and only
//! then recorded as the new offset: an offset the store reports is never more than the bytes
//! on disk, and a tail that was never acknowledged is cut at the next append. The first
//! bytes are sniffed as soon as they are there. Bodies go through the spool's writer (its
//! threads hash and write at once) and on the upload's running sha256
//! ([`RunningHash`]). When the offset reaches the length, the file enters
//! [`Gateway::accept`] like any upload, hashed already if this process received all of it
//! (else, or for a text file's UTF-8, read once); the bytes
//! stay until it is delivered, so a failed delivery can be retried by a final request with
//! an empty body. Partial uploads (concatenation) stop there; a final upload joins its
//! partials in the spool, then completes. Every step on one upload holds it (`hold.rs`: on
//! several nodes, one request at a time; another gets 409).

use std::time::Duration;

use actix_web::web::Payload;
use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::content::{self, SNIFF_LEN};
use crate::error::ApiError;
use crate::spool::{AppendFile, SpoolWriter};
use crate::store::{Concat, SessionRecord, StoreError, UploadRecord};
use crate::vocab::{DialectName, now_ms};

use super::admit::Admission;
use super::hold::{holding, lock_session};
use super::intake::{
    body_error, complete_file, extension_of, next_or_stall, received_file, validate_filename,
};
use super::running_hash::RunningHash;
use super::{Gateway, Metadata, Noted};

/// Most partial uploads one final upload may join.
pub(crate) const MAX_PARTS: usize = 1000;

/// What a client declares when it creates an upload.
#[derive(Debug, Clone)]
pub(crate) struct Creation {
    /// The whole length, or `None` when the client defers it.
    pub(crate) length: Option<u64>,
    /// The client's filename (checked like any filename); the upload's id when it gave none.
    pub(crate) filename: Option<String>,
    pub(crate) metadata: Metadata,
    /// A partial upload, to be joined by a final one.
    pub(crate) partial: bool,
}

/// A checksum the client sent for one request's body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Checksum {
    Sha1(Vec<u8>),
    Md5(Vec<u8>),
    Sha256(Vec<u8>),
}

/// The running digest of a [`Checksum`]'s algorithm.
enum Hasher {
    Sha1(Sha1),
    Md5(Md5),
    Sha256(Sha256),
}

impl Hasher {
    fn for_checksum(checksum: &Checksum) -> Self {
        match checksum {
            Checksum::Sha1(_) => Self::Sha1(Sha1::new()),
            Checksum::Md5(_) => Self::Md5(Md5::new()),
            Checksum::Sha256(_) => Self::Sha256(Sha256::new()),
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        match self {
            Self::Sha1(hasher) => hasher.update(bytes),
            Self::Md5(hasher) => hasher.update(bytes),
            Self::Sha256(hasher) => hasher.update(bytes),
        }
    }

    fn matches(self, checksum: &Checksum) -> bool {
        let digest = match self {
            Self::Sha1(hasher) => hasher.finalize().to_vec(),
            Self::Md5(hasher) => hasher.finalize().to_vec(),
            Self::Sha256(hasher) => hasher.finalize().to_vec(),
        };
        let expected = match checksum {
            Checksum::Sha1(bytes) | Checksum::Md5(bytes) | Checksum::Sha256(bytes) => bytes,
        };
        digest == *expected
    }
}

/// What one request appends.
#[derive(Debug, Clone)]
pub(crate) struct Append {
    /// Where the client believes the upload is (`Upload-Offset`).
    pub(crate) offset: u64,
    /// The length, for an upload whose length was deferred (`Upload-Length`).
    pub(crate) length: Option<u64>,
    pub(crate) checksum: Option<Checksum>,
}

/// Where an upload stands after a request.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    pub(crate) upload: SessionRecord,
    /// The records made when this request completed the upload.
    pub(crate) records: Vec<UploadRecord>,
}

impl SessionRecord {
    /// The durable offset of a resumable upload.
    pub(crate) fn offset(&self) -> u64 {
        self.received_bytes()
    }

    /// The declared length, `None` while it is deferred.
    pub(crate) fn length(&self) -> Option<u64> {
        (!self.length_deferred).then_some(self.declared_size)
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.length() == Some(self.offset())
    }
}

impl Gateway {
    /// Creates a resumable upload for the admitted tenant (no bytes yet).
    pub(crate) async fn create_resumable(
        &self,
        admission: &Admission,
        creation: Creation,
    ) -> Result<SessionRecord, ApiError> {
        self.check_disk_floor()?;
        let id = admission.dialect.new_upload_id();
        let filename = creation.filename.unwrap_or_else(|| id.clone());
        validate_filename(&filename)?;
        let extension = extension_of(&filename);
        let plan = &admission.tenant.plan;
        // A partial upload is a slice of a file, nameless as clients send it: the final upload
        // that joins it is the file, and is checked as one.
        if !creation.partial {
            plan.check_extension(&extension)?;
        }
        if let Some(length) = creation.length {
            plan.check_size(length)?;
        }
        let concat = creation.partial.then_some(Concat::Partial);
        self.insert_resumable(
            admission,
            id,
            filename,
            extension,
            creation.length,
            creation.metadata,
            concat,
        )
        .await
    }

    /// Creates a resumable upload from a creation request that carries all of it (its body is
    /// its `Upload-Length`, with no checksum): the body is received like a single upload (one
    /// spool file, size-capped, hashed and content-checked as it streams, no upload file of
    /// its own), accepted, and the upload recorded complete with the record it became, so
    /// HEAD and termination see it as any completed upload. The same answers as creating
    /// and appending, in three store writes instead of five. A refusal or a failed delivery
    /// keeps nothing (the answer carries no Location to resume from).
    pub(crate) async fn create_whole_resumable(
        &self,
        admission: &Admission,
        creation: Creation,
        mut body: Payload,
    ) -> Result<Progress, ApiError> {
        self.check_disk_floor()?;
        let length = creation.length.ok_or(ApiError::MissingField("Upload-Length"))?;
        let id = admission.dialect.new_upload_id();
        let filename = creation.filename.unwrap_or_else(|| id.clone());
        validate_filename(&filename)?;
        let extension = extension_of(&filename);
        let plan = &admission.tenant.plan;
        plan.check_extension(&extension)?;
        plan.check_size(length)?;
        let idle = admission.policy.config.server.idle_timeout.0;
        let record_id = DialectName::Tus.new_upload_id();
        let mut writer = SpoolWriter::new(
            &self.spool,
            &self.intake_budget,
            &record_id,
            length,
            content::is_text_extension(&extension),
        );
        while let Some(bytes) = next_or_stall(&mut body, idle).await? {
            writer.write(&bytes.map_err(body_error)?).await?;
        }
        let file = complete_file(
            writer,
            record_id.clone(),
            filename.clone(),
            extension.clone(),
            plan.config.verify_content,
        )
        .await?;
        if file.size != length {
            return Err(ApiError::Malformed(format!(
                "the body has {} bytes, Upload-Length says {length}",
                file.size
            )));
        }
        let mut upload = self.new_resumable(
            admission,
            id,
            filename,
            extension,
            Some(length),
            creation.metadata,
            None,
        );
        upload.chunks = vec![(0, length)];
        upload.upload_id = Some(record_id);
        // Recorded before the upload is accepted, so that no record exists whose upload
        // does not; if the accept fails, the upload goes again.
        self.store.insert_session(upload.clone()).await?;
        match self
            .accept(admission, vec![file.into()], upload.metadata.clone())
            .await
        {
            Ok(records) => {
                tracing::info!(upload_id = %upload.id, record = %records[0].id, "resumable upload received whole");
                Ok(Progress { upload, records })
            }
            Err(error) => {
                if let Err(store_error) = self.store.delete_session(upload.id.clone()).await {
                    tracing::warn!(upload_id = %upload.id, error = %store_error,
                        "cannot remove a refused upload; it expires with the sessions");
                }
                Err(error)
            }
        }
    }

    /// A new resumable upload's row, not yet stored.
    #[allow(clippy::too_many_arguments)]
    fn new_resumable(
        &self,
        admission: &Admission,
        id: String,
        filename: String,
        extension: String,
        length: Option<u64>,
        metadata: Metadata,
        concat: Option<Concat>,
    ) -> SessionRecord {
        let now = now_ms();
        let expiry = admission.policy.config.server.session_expiry.0;
        SessionRecord {
            id,
            tenant: admission.tenant.name.clone(),
            dialect: admission.dialect,
            filename,
            extension,
            declared_size: length.unwrap_or(0),
            length_deferred: length.is_none(),
            total_chunks: 1,
            metadata,
            created_at_ms: now,
            expires_at_ms: now.saturating_add(expiry.as_millis().min(i64::MAX as u128) as i64),
            chunks: Vec::new(),
            concat,
            upload_id: None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn insert_resumable(
        &self,
        admission: &Admission,
        id: String,
        filename: String,
        extension: String,
        length: Option<u64>,
        metadata: Metadata,
        concat: Option<Concat>,
    ) -> Result<SessionRecord, ApiError> {
        let upload = self.new_resumable(admission, id, filename, extension, length, metadata, concat);
        // A final upload is completed (or removed) by the request that creates it, and
        // takes the place of the partials it joins: it never adds an open upload.
        if matches!(upload.concat, Some(Concat::Final { .. })) {
            self.store.insert_session(upload.clone()).await?;
        } else {
            self.insert_open_session(admission, upload.clone()).await?;
        }
        tracing::info!(upload_id = %upload.id, tenant = %upload.tenant, length = ?length, "resumable upload created");
        Ok(upload)
    }

    /// The admitted tenant's resumable upload `id`: 404 for a malformed id, an unknown one
    /// or another tenant's; 410 for one expired but not swept yet.
    pub(crate) async fn resumable(&self, admission: &Admission, id: &str) -> Result<SessionRecord, ApiError> {
        if !admission.dialect.is_valid_upload_id(id) {
            return Err(ApiError::NotFound);
        }
        let upload = self
            .store
            .session_of(admission.tenant.name.clone(), id.to_owned())
            .await?
            .filter(|upload| upload.dialect == admission.dialect)
            .ok_or(ApiError::NotFound)?;
        if upload.expires_at_ms <= now_ms() {
            return Err(ApiError::SessionExpired);
        }
        Ok(upload)
    }

    /// Whether `id` is the admitted tenant's resumable upload ([`Gateway::resumable`]'s
    /// errors): asked before waiting for another request's hold on it.
    async fn owned_resumable(&self, admission: &Admission, id: &str) -> Result<(), ApiError> {
        self.resumable(admission, id).await.map(drop)
    }

    /// Appends a request's body to upload `id` at `append.offset` (see the module docs).
    pub(crate) async fn append_resumable(
        &self,
        admission: &Admission,
        id: &str,
        append: Append,
        body: Payload,
    ) -> Result<Progress, ApiError> {
        self.check_disk_floor()?;
        holding(
            &self.store,
            id,
            self.owned_resumable(admission, id),
            self.append_held(admission, id, append, body),
        )
        .await
    }

    /// [`Gateway::append_resumable`], the upload held.
    async fn append_held(
        &self,
        admission: &Admission,
        id: &str,
        append: Append,
        body: Payload,
    ) -> Result<Progress, ApiError> {
        let mut upload = self.resumable(admission, id).await?;
        // A final upload is made of its partials: no PATCH applies to it (tus: 403).
        if matches!(upload.concat, Some(Concat::Final { .. })) {
            return Err(ApiError::ImmutableUpload);
        }
        if append.offset != upload.offset() {
            return Err(ApiError::OffsetMismatch {
                offset: upload.offset(),
            });
        }
        let plan = &admission.tenant.plan;
        if upload.upload_id.is_some() {
            match self.completion_due(admission, &upload).await? {
                // Another node's completion, or one whose daemon died, still delivering.
                Completion::Running => return Err(ApiError::SessionBusy),
                // Noted by a completion that never ended or failed: its bytes are still
                // here, and it is completed again below.
                Completion::Due => upload.upload_id = None,
                Completion::NotDue => {}
            }
        }
        if upload.upload_id.is_some() {
            // Complete: its bytes are its upload's now and the session keeps none. An empty
            // PATCH at its end changes nothing; any byte more is beyond its length.
            let idle = admission.policy.config.server.idle_timeout.0;
            return match body_is_empty(body, idle).await? {
                true => Ok(Progress {
                    upload,
                    records: Vec::new(),
                }),
                false => Err(ApiError::TooLarge {
                    limit: upload.declared_size.min(plan.max_file_size()),
                }),
            };
        }
        if let Some(length) = append.length {
            match upload.length() {
                Some(declared) if declared != length => {
                    return Err(ApiError::Malformed(
                        "Upload-Length cannot change once it is set".into(),
                    ));
                }
                Some(_) => {}
                None => {
                    plan.check_size(length)?;
                    if length < upload.offset() {
                        return Err(ApiError::Malformed(
                            "Upload-Length is shorter than the bytes already received".into(),
                        ));
                    }
                    self.store.set_session_length(id.to_owned(), length).await?;
                    upload.declared_size = length;
                    upload.length_deferred = false;
                }
            }
        }
        // The most this upload may ever hold: its length, within the plan's limit (which a
        // reload may have lowered since it was created).
        let limit = upload.length().unwrap_or(u64::MAX).min(plan.max_file_size());
        let offset = upload.offset();
        let Written {
            bytes: written,
            cut_short,
            running,
        } = self
            .write_at(&upload, offset, limit, append.checksum.as_ref(), body, admission)
            .await?;
        let new_offset = offset + written;
        if written > 0 {
            // A partial's bytes are sniffed as part of its final upload, not on their own.
            let sniffed = plan.config.verify_content && upload.concat != Some(Concat::Partial);
            if offset < SNIFF_LEN as u64
                && sniffed
                && let Err(error) = self.sniff(&upload, new_offset).await
            {
                self.cut(&upload.id, offset).await;
                return Err(error);
            }
            if let Err(error) = self.store.put_chunk(id.to_owned(), 0, new_offset).await {
                // The database refused it because the upload expired and was swept while this
                // request held it: gone (its files go with the next sweep), not an internal
                // error. (An unavailable store is asked nothing more: 503 at once.)
                let swept = matches!(error, StoreError::Database(_))
                    && matches!(
                        self.store
                            .session_of(admission.tenant.name.clone(), id.to_owned())
                            .await,
                        Ok(None)
                    );
                return Err(if swept {
                    ApiError::SessionExpired
                } else {
                    error.into()
                });
            }
            upload.chunks = vec![(0, new_offset)];
        }
        if let Some(state) = running {
            RunningHash::advance(id, new_offset, state);
        }
        if let Some(error) = cut_short {
            // What arrived is kept and recorded; the client resumes from HEAD's offset.
            return Err(error);
        }
        let mut records = Vec::new();
        if upload.is_complete() && upload.concat != Some(Concat::Partial) && upload.upload_id.is_none() {
            records = self.complete_resumable(admission, &mut upload).await?;
        }
        Ok(Progress { upload, records })
    }

    /// Streams `body` into the upload's file at `offset`, at most `limit - offset` bytes;
    /// returns how many were written. Its bytes go on the upload's running sha256 when this
    /// process hashed the upload up to `offset`. On any error, what this request wrote is
    /// cut again.
    async fn write_at(
        &self,
        upload: &SessionRecord,
        offset: u64,
        limit: u64,
        checksum: Option<&Checksum>,
        mut body: Payload,
        admission: &Admission,
    ) -> Result<Written, ApiError> {
        let idle = admission.policy.config.server.idle_timeout.0;
        let spool = self.spool.clone();
        let id = upload.id.clone();
        // Opening also cuts a tail a crash left after the last acknowledged offset.
        let mut target = tokio::task::spawn_blocking(move || spool.open_append(&id, offset)).await??;
        let file = target.file.take().ok_or(ApiError::Internal)?;
        // Taken out until the new offset is recorded: a request that fails leaves none. A
        // partial's hash is never used (its final upload is hashed whole).
        let running =
            RunningHash::take(&upload.id, offset).filter(|_| upload.concat != Some(Concat::Partial));
        let continuing = running.is_some();
        let mut writer = SpoolWriter::in_place(
            &self.spool,
            &self.intake_budget,
            file,
            target.path.clone(),
            // A reload may have lowered the plan's limit below the offset: no room then.
            limit.saturating_sub(offset),
            running.unwrap_or_default(),
        );
        let mut hasher = checksum.map(Hasher::for_checksum);
        // A body cut short (the client went away, or stalled) keeps what arrived, as the
        // protocol asks, unless the request carried a checksum, which only the whole body
        // can match.
        let mut cut_short = None;
        // A body still arriving when the upload expires ends there (410): no request keeps
        // an upload past its expiry.
        let expiry = tokio::time::Instant::now()
            + Duration::from_millis(
                u64::try_from(upload.expires_at_ms.saturating_sub(now_ms())).unwrap_or(0),
            );
        let received: Result<(), ApiError> = async {
            loop {
                let next = tokio::time::timeout_at(expiry, next_or_stall(&mut body, idle))
                    .await
                    .map_err(|_| ApiError::SessionExpired)?;
                let bytes = match next {
                    Ok(Some(Ok(bytes))) => bytes,
                    Ok(None) => break,
                    Ok(Some(Err(error))) => {
                        cut_short = Some(body_error(error));
                        break;
                    }
                    Err(stalled) => {
                        cut_short = Some(stalled);
                        break;
                    }
                };
                if let Some(hasher) = &mut hasher {
                    hasher.update(&bytes);
                }
                writer.write(&bytes).await.map_err(|error| match error {
                    // The writer knows only the room left; the client is told the limit.
                    ApiError::TooLarge { .. } => ApiError::TooLarge {
                        limit: admission.tenant.plan.max_file_size().min(limit),
                    },
                    other => other,
                })?;
            }
            match (&cut_short, checksum) {
                (Some(error), Some(_)) => Err(error.clone()),
                _ => Ok(()),
            }
        }
        .await;
        let outcome = match received {
            Ok(()) => {
                self.commit_write(upload, offset, checksum, hasher, writer, target)
                    .await
            }
            Err(error) => {
                writer.abandon().await;
                Err(error)
            }
        };
        match outcome {
            Ok((written, state)) => Ok(Written {
                bytes: written,
                cut_short,
                running: continuing.then_some(state),
            }),
            Err(error) => {
                self.cut(&upload.id, offset).await;
                Err(error)
            }
        }
    }

    /// Writes the rest of a received body, checks the client's checksum and commits the
    /// bytes: how many, and the sha256 state of the upload up to their end.
    async fn commit_write(
        &self,
        upload: &SessionRecord,
        offset: u64,
        checksum: Option<&Checksum>,
        hasher: Option<Hasher>,
        writer: SpoolWriter,
        target: AppendFile,
    ) -> Result<(u64, Sha256), ApiError> {
        let (_, written, state, ..) = writer.finish_open().await?;
        if let (Some(hasher), Some(checksum)) = (hasher, checksum)
            && !hasher.matches(checksum)
        {
            return Err(ApiError::ChecksumMismatch);
        }
        // Durable (in place, or put in the shared spool) before the offset is recorded.
        let (spool, id) = (self.spool.clone(), upload.id.clone());
        tokio::task::spawn_blocking(move || spool.commit_append(&id, offset, written, target)).await??;
        Ok((written, state))
    }

    /// Cuts the upload's file back to `offset` (bytes of a refused request), once no writer
    /// holds it.
    async fn cut(&self, id: &str, offset: u64) {
        let (spool, owned) = (self.spool.clone(), id.to_owned());
        let cut = tokio::task::spawn_blocking(move || spool.cut(&owned, offset)).await;
        if let Ok(Err(error)) = cut {
            tracing::error!(upload_id = %id, %error, "cannot cut a refused request's bytes");
        }
    }

    /// Checks the first bytes against the upload's extension once they are there (or the
    /// upload is shorter and complete).
    async fn sniff(&self, upload: &SessionRecord, offset: u64) -> Result<(), ApiError> {
        if offset < SNIFF_LEN as u64 && upload.length() != Some(offset) {
            return Ok(());
        }
        let (spool, id) = (self.spool.clone(), upload.id.clone());
        let head = tokio::task::spawn_blocking(move || spool.head(&id, offset, SNIFF_LEN as u64)).await??;
        // Text is checked whole at completion; here the head only has to look like it.
        content::classify(&upload.extension, &head, content::looks_like_text(&head), true)?;
        Ok(())
    }

    /// A complete upload enters the record flow: hashed in one read pass, its content
    /// checked, linked into the spool as an ordinary spooled file (the upload's own bytes
    /// stay until delivery succeeded), and accepted.
    async fn complete_resumable(
        &self,
        admission: &Admission,
        upload: &mut SessionRecord,
    ) -> Result<Vec<UploadRecord>, ApiError> {
        // The plan now, which a reload may have changed since the upload was created.
        let plan = &admission.tenant.plan;
        plan.check_extension(&upload.extension)?;
        plan.check_size(upload.declared_size)?;
        let upload_id = DialectName::Tus.new_upload_id();
        let spool = self.spool.clone();
        let (session, name) = (upload.id.clone(), upload_id.clone());
        let length = upload.declared_size;
        let text = content::is_text_extension(&upload.extension);
        // Hashed as the bytes arrived, when this process saw them all; a text file is read
        // whole for its UTF-8.
        let hashed = RunningHash::sha256_of(&session, length).filter(|_| !text);
        let (path, digest) = tokio::task::spawn_blocking(move || {
            let path = spool.link_part(&session, length, &name)?;
            let digest = match hashed {
                Some(sha256) => crate::spool::digest_hashed(&path, sha256),
                None => crate::spool::digest(&path, text),
            };
            let digest = digest.and_then(|digest| match digest.size == length {
                true => Ok(digest),
                false => Err(std::io::Error::other(format!(
                    "{} bytes spooled for an upload of {length}",
                    digest.size
                ))),
            });
            if digest.is_err() {
                let _ = std::fs::remove_file(&path);
            }
            std::io::Result::Ok((path, digest?))
        })
        .await??;
        let file = received_file(
            path,
            digest,
            upload_id,
            upload.filename.clone(),
            upload.extension.clone(),
            admission.tenant.plan.config.verify_content,
        )
        .await?;
        // The upload's id is noted before it is recorded (and taken back when this attempt
        // fails), so that a completion the daemon's death cut short is found and done again,
        // and one that ended is never done twice.
        let noted = file.upload_id.clone();
        let accepted = self.accept(admission, vec![file.into()], upload.metadata.clone());
        let records = self.noting(&upload.id, &noted, accepted).await?;
        upload.upload_id = Some(noted);
        // Recorded (and delivered, or durable in the spool for the outbox): the upload's own
        // copy of the bytes goes.
        self.remove_session_files(&upload.id).await;
        tracing::info!(upload_id = %upload.id, record = %records[0].id, "resumable upload completed");
        Ok(records)
    }

    /// Whether `upload` holds all its bytes but no upload was made of them: its completion
    /// failed (a sync delivery the provider refused) or never ended (the daemon died during
    /// it). A partial upload is never completed on its own; a final upload whose completion
    /// failed is gone, and its client joins the partials again.
    pub(crate) async fn completion_due(
        &self,
        admission: &Admission,
        upload: &SessionRecord,
    ) -> Result<Completion, ApiError> {
        if !upload.is_complete() || upload.concat.is_some() {
            return Ok(Completion::NotDue);
        }
        Ok(match self.noted_upload(&admission.tenant.name, upload).await? {
            Noted::Made(_) => Completion::NotDue,
            Noted::Running => Completion::Running,
            Noted::Unmade => Completion::Due,
            Noted::Failed if self.holds_bytes(upload).await? => Completion::Due,
            Noted::Failed => Completion::NotDue,
        })
    }

    /// Whether the upload's own bytes are still in the spool (they go once a completion
    /// succeeded).
    async fn holds_bytes(&self, upload: &SessionRecord) -> Result<bool, ApiError> {
        if upload.declared_size == 0 {
            return Ok(false);
        }
        let (spool, id, length) = (self.spool.clone(), upload.id.clone(), upload.declared_size);
        match tokio::task::spawn_blocking(move || spool.head(&id, length, 1)).await? {
            Ok(head) => Ok(!head.is_empty()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Completes upload `id` if its [`Gateway::completion_due`] (what an empty `PATCH` at
    /// its end does too): the way a client that resumes with `HEAD` alone, seeing every byte
    /// there, still gets its upload made. It never waits: while another request holds the
    /// upload, or a completion is still delivering, it is [`ApiError::UploadLocked`] (423),
    /// which tus clients retry.
    pub(crate) async fn finish_resumable(
        &self,
        admission: &Admission,
        id: &str,
    ) -> Result<Progress, ApiError> {
        let locked = async { Err(ApiError::UploadLocked) };
        holding(&self.store, id, locked, async {
            let mut upload = self.resumable(admission, id).await?;
            let records = match self.completion_due(admission, &upload).await? {
                Completion::Due => self.complete_resumable(admission, &mut upload).await?,
                Completion::Running => return Err(ApiError::UploadLocked),
                Completion::NotDue => Vec::new(),
            };
            Ok(Progress { upload, records })
        })
        .await
        .map_err(|error| match error {
            ApiError::SessionBusy => ApiError::UploadLocked,
            other => other,
        })
    }

    /// Creates a final upload joining the tenant's complete partial uploads `parts` in
    /// order, then completes it like any upload. The partials are used up once it is
    /// recorded (the protocol lets a server delete them): they would otherwise hold their
    /// bytes and count against `max_open_sessions` until they expire, and could be joined
    /// again and again into more files. Each partial is named once.
    pub(crate) async fn concatenate(
        &self,
        admission: &Admission,
        parts: Vec<String>,
        filename: Option<String>,
        metadata: Metadata,
    ) -> Result<Progress, ApiError> {
        self.check_disk_floor()?;
        if parts.is_empty() || parts.len() > MAX_PARTS {
            return Err(ApiError::Malformed(format!(
                "a final upload joins 1 to {MAX_PARTS} partial uploads"
            )));
        }
        let mut named = std::collections::HashSet::with_capacity(parts.len());
        if let Some(twice) = parts.iter().find(|part| !named.insert(part.as_str())) {
            return Err(ApiError::Malformed(format!(
                "{twice} is named twice in the final upload"
            )));
        }
        let mut length = 0u64;
        let mut sources = Vec::with_capacity(parts.len());
        for part in &parts {
            let partial = self.resumable(admission, part).await?;
            if partial.concat != Some(Concat::Partial) || !partial.is_complete() {
                return Err(ApiError::Malformed(format!(
                    "{part} is not a complete partial upload"
                )));
            }
            length = length.saturating_add(partial.declared_size);
            sources.push((part.clone(), partial.declared_size));
        }
        let plan = &admission.tenant.plan;
        plan.check_size(length)?;
        let id = admission.dialect.new_upload_id();
        let filename = filename.unwrap_or_else(|| id.clone());
        validate_filename(&filename)?;
        let extension = extension_of(&filename);
        plan.check_extension(&extension)?;
        let _lock = lock_session(&id).await;
        let mut upload = self
            .insert_resumable(
                admission,
                id.clone(),
                filename,
                extension,
                Some(length),
                metadata,
                Some(Concat::Final { parts: parts.clone() }),
            )
            .await?;
        // A partial of 0 bytes has no file (it never had a PATCH): nothing of it to join.
        sources.retain(|(_, length)| *length > 0);
        let completed = async {
            let spool = self.spool.clone();
            let target = id.clone();
            let joined = tokio::task::spawn_blocking(move || spool.join(&target, &sources)).await??;
            if joined != length {
                return Err(ApiError::Malformed(
                    "the partial uploads changed while they were joined".into(),
                ));
            }
            self.store.put_chunk(id.clone(), 0, length).await?;
            upload.chunks = vec![(0, length)];
            self.complete_resumable(admission, &mut upload).await
        }
        .await;
        match completed {
            Ok(records) => {
                for part in &parts {
                    if let Err(error) = self.store.delete_session(part.clone()).await {
                        tracing::warn!(upload_id = %part, %error,
                            "cannot remove a joined partial upload; it expires with the sessions");
                    }
                    self.remove_session_files(part).await;
                }
                Ok(Progress { upload, records })
            }
            Err(error) => {
                // A final upload takes no PATCH, so nothing could resume it: it goes now (its
                // partials stay, for the client to join again).
                if let Err(store_error) = self.store.delete_session(id.clone()).await {
                    tracing::warn!(upload_id = %id, error = %store_error,
                        "cannot remove a final upload that failed; it expires with the sessions");
                }
                self.remove_session_files(&id).await;
                Err(error)
            }
        }
    }

    /// Terminates upload `id`: its bytes and its row go (a record it completed stays).
    pub(crate) async fn terminate_resumable(&self, admission: &Admission, id: &str) -> Result<(), ApiError> {
        holding(&self.store, id, self.owned_resumable(admission, id), async {
            self.resumable(admission, id).await?;
            self.store.delete_session(id.to_owned()).await?;
            self.remove_session_files(id).await;
            Ok(())
        })
        .await
    }
}

/// Whether a complete resumable upload's completion is to be made now
/// ([`Gateway::completion_due`]).
pub(crate) enum Completion {
    /// Not complete, a part of a concatenation, or made already.
    NotDue,
    /// Another completion is still delivering it.
    Running,
    /// Every byte is here and no upload was made of them.
    Due,
}

/// What one request's body left in the file.
struct Written {
    bytes: u64,
    /// Why the body ended before its end, its bytes so far kept.
    cut_short: Option<ApiError>,
    /// The upload's sha256 state up to the end of these bytes, when this process hashed
    /// it from the start.
    running: Option<Sha256>,
}

/// Whether a request's body holds no byte (read to its end, which for a body that has
/// one is its first piece: the request is refused then).
async fn body_is_empty(mut body: Payload, idle: Duration) -> Result<bool, ApiError> {
    loop {
        match next_or_stall(&mut body, idle).await? {
            None => return Ok(true),
            Some(Ok(bytes)) if bytes.is_empty() => continue,
            Some(Ok(_)) => return Ok(false),
            Some(Err(error)) => return Err(body_error(error)),
        }
    }
}
