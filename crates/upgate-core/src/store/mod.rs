//! The store: upload records, chunked sessions, daily usage and the delivery outbox.
//!
//! What flows through here: the neutral records of the upload flow ([`UploadRecord`],
//! [`SessionRecord`]) in, and the same records, counts and verdicts out, through the
//! [`Store`] trait: the seam for where they live. [`sqlite::SqliteStore`] (one file in
//! `data_dir`, the embedded default) and [`postgres::PostgresStore`] (a database several
//! nodes share, `server.store.url`) implement it, and no caller knows which. Nothing here
//! knows about HTTP, dialect shapes, or SQLite and PostgreSQL types outside their folders.

pub(crate) mod postgres;
pub(crate) mod sqlite;

use futures_util::future::BoxFuture;
use serde::Serialize;

use crate::vocab::DialectName;

/// A store failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed a statement.
    #[error("database error: {0}")]
    Database(String),
    #[error("the store thread has stopped")]
    Closed,
    #[error("cannot open the database at {path}: {message}")]
    Open { path: String, message: String },
    /// The database cannot be reached or did not answer in time (a shared store that is
    /// down, restarting or overloaded): worth retrying later.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// The database's disk is full.
    #[error("the database's disk is full")]
    Full,
}

/// Where an upload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadState {
    /// Stored here, not (yet) delivered upstream.
    Received,
    /// Being delivered now (sync delivery), under a lease: the record is written before the
    /// provider is called, so a daemon that dies during the call leaves a record of it (failed
    /// once the lease ends), never a copy upstream that no record explains.
    Delivering,
    Forwarded,
    Failed,
    Deleted,
}

impl std::str::FromStr for UploadState {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::parse(text).ok_or_else(|| {
            format!("`{text}` is not a state (received, delivering, forwarded, failed, deleted)")
        })
    }
}

impl UploadState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Delivering => "delivering",
            Self::Forwarded => "forwarded",
            Self::Failed => "failed",
            Self::Deleted => "deleted",
        }
    }

    /// Whether a record in this state waits for a time (`next_attempt_at`): the outbox's due
    /// time of a `received` upload, the lease end of a `delivering` one.
    pub(crate) fn waits(self) -> bool {
        matches!(self, Self::Received | Self::Delivering)
    }

    /// The state a stored name stands for; `None` for a name no version of upgate writes.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        [
            Self::Received,
            Self::Delivering,
            Self::Forwarded,
            Self::Failed,
            Self::Deleted,
        ]
        .into_iter()
        .find(|state| state.as_str() == text)
    }
}

/// One row of `uploads`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UploadRecord {
    pub id: String,
    pub tenant: String,
    pub dialect: DialectName,
    pub filename: String,
    pub extension: String,
    pub mime: String,
    pub size: u64,
    pub sha256: String,
    pub state: UploadState,
    pub provider: String,
    pub remote_id: Option<String>,
    pub remote_url: Option<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// Which uploads an operator lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UploadFilter {
    pub state: Option<UploadState>,
    pub tenant: Option<String>,
    /// Only uploads created at or after this time (epoch milliseconds).
    pub since_ms: Option<i64>,
    /// At most this many, newest first.
    pub limit: usize,
}

/// One row of `sessions`, with the chunks received so far.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionRecord {
    pub id: String,
    pub tenant: String,
    pub dialect: DialectName,
    pub filename: String,
    pub extension: String,
    /// The whole file's size (for a resumable upload whose length is deferred: 0).
    pub declared_size: u64,
    /// A resumable upload whose length the client will say later.
    pub length_deferred: bool,
    pub total_chunks: u64,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// (chunk number, size), ordered by chunk number. A resumable upload has one chunk,
    /// whose size is its durable offset.
    pub chunks: Vec<(u64, u64)>,
    /// A resumable upload that is part of a concatenation.
    pub concat: Option<Concat>,
    /// The upload record a resumable upload became, once delivered or queued.
    pub upload_id: Option<String>,
}

/// The role of a resumable upload in a concatenation (tus `Upload-Concat`). Serialized
/// (`upgate sessions list --json`) as its name, `"partial"` or `"final"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Concat {
    /// A part, never recorded itself.
    Partial,
    /// The join of the partial uploads `parts` (their ids, in order), recorded like any
    /// upload. A final upload created before upgate kept its parts (SQLite schema 8,
    /// PostgreSQL schema 3) has none.
    Final { parts: Vec<String> },
}

impl Serialize for Concat {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl Concat {
    /// The `concat` column.
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Self::Partial => "partial",
            Self::Final { .. } => "final",
        }
    }

    /// The `concat_parts` column: a final upload's part ids, space-separated (an upload id
    /// has no space: see `DialectName::is_valid_upload_id`).
    pub(crate) fn parts_column(&self) -> Option<String> {
        match self {
            Self::Partial => None,
            Self::Final { parts } => Some(parts.join(" ")),
        }
    }

    /// From the `concat` and `concat_parts` columns; `None` for a `concat` no upgate writes.
    pub(crate) fn from_columns(kind: &str, parts: Option<&str>) -> Option<Self> {
        match kind {
            "partial" => Some(Self::Partial),
            "final" => Some(Self::Final {
                parts: parts
                    .unwrap_or_default()
                    .split(' ')
                    .filter(|part| !part.is_empty())
                    .map(str::to_owned)
                    .collect(),
            }),
            _ => None,
        }
    }
}

/// The most chunks a session has (a Kore session's `totalChunks`; a tus upload has one).
pub(crate) const MAX_SESSION_CHUNKS: u64 = 10_000;

/// How long an outbox entry whose row this node cannot read waits before it is tried again
/// (by a node that can, in a cluster of several versions; in any case never blocking the
/// others behind it).
pub(crate) const UNREADABLE_ROW_WAIT_MS: i64 = 3_600_000;

/// A stored `metadata` column: a JSON object. Anything else is an unreadable row, never
/// an empty map (a provider chooses its destination from it).
pub(crate) fn stored_metadata(text: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        _ => Err("metadata is not a JSON object".into()),
    }
}

/// A listed row that cannot be read, named by its id (its first 64 characters), so that an
/// operator can find it: one such row fails the listing, saying which.
pub(crate) fn unreadable_row(id: &str, error: impl std::fmt::Display) -> StoreError {
    let id: String = id.chars().take(64).collect();
    StoreError::Database(format!("the row {id} cannot be read: {error}"))
}

/// A stored size, count or number: negative is an unreadable row, never a wrapped value.
pub(crate) fn stored_unsigned<T: TryFrom<i64>>(column: &str, value: i64) -> Result<T, String> {
    T::try_from(value).map_err(|_| format!("{column} is out of range: {value}"))
}

impl SessionRecord {
    /// A session as read from a store, checked: its chunk count within
    /// [`MAX_SESSION_CHUNKS`] and every chunk's number below it. (A count read as
    /// 2^64 - 1 would have `complete` list that many missing chunks.)
    pub(crate) fn checked(self) -> Result<Self, String> {
        if !(1..=MAX_SESSION_CHUNKS).contains(&self.total_chunks) {
            return Err(format!("total_chunks is out of range: {}", self.total_chunks));
        }
        if let Some((number, _)) = self
            .chunks
            .iter()
            .find(|(number, _)| *number >= self.total_chunks)
        {
            return Err(format!(
                "chunk {number} is past total_chunks {}",
                self.total_chunks
            ));
        }
        Ok(self)
    }

    pub(crate) fn received_bytes(&self) -> u64 {
        self.chunks.iter().map(|(_, size)| size).sum()
    }

    /// The recorded size of chunk `number` (0 for one not received).
    pub(crate) fn chunk_size(&self, number: u64) -> u64 {
        self.chunks
            .iter()
            .find(|(recorded, _)| *recorded == number)
            .map_or(0, |(_, size)| *size)
    }
}

/// An answer of the store, when its work has been committed.
pub(crate) type StoreFuture<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// Where records, sessions, usage and the outbox live. Every method answers after its
/// writes are committed (durable per `server.durability`).
pub(crate) trait Store: Send + Sync {
    // uploads
    /// Inserts upload records. Those in state `received` enter the outbox, due at `due_ms`;
    /// those `delivering` are leased until `due_ms`; the others do not wait for anything.
    fn insert_uploads(&self, records: Vec<UploadRecord>, due_ms: i64) -> StoreFuture<'_, ()>;
    /// Writes the outcome of sync deliveries (state, attempts, remote id and URL, last error)
    /// over their `delivering` records; the number of records that were still `delivering`.
    fn record_outcomes(&self, records: Vec<UploadRecord>) -> StoreFuture<'_, usize>;
    /// Fails the sync deliveries whose lease ended before `now` (their daemon died during the
    /// provider call) with `reason`, and returns them.
    fn fail_interrupted_deliveries(&self, now: i64, reason: String) -> StoreFuture<'_, Vec<UploadRecord>>;
    /// Ids of uploads whose bytes must stay in the spool (received, not yet delivered).
    fn spooled_ids(&self) -> StoreFuture<'_, std::collections::HashSet<String>>;
    /// Marks an upload deleted (and out of the outbox); `false` if it was deleted already.
    fn mark_deleted(&self, id: String) -> StoreFuture<'_, bool>;
    /// Any tenant's upload.
    fn upload(&self, id: String) -> StoreFuture<'_, Option<UploadRecord>>;
    /// Uploads per `filter`, newest first (operator listings).
    fn list_uploads(&self, filter: UploadFilter) -> StoreFuture<'_, Vec<UploadRecord>>;
    /// Puts a failed upload back in the outbox, due now; `false` if it is not failed.
    fn retry_upload(&self, id: String) -> StoreFuture<'_, bool>;
    /// `tenant`'s upload `id`, `None` for another tenant's.
    fn upload_of(&self, tenant: String, id: String) -> StoreFuture<'_, Option<UploadRecord>>;

    // outbox
    /// Records a delivery made under the claim whose lease ends at `lease_until` (the
    /// claim's fencing token); `false` if the upload was deleted meanwhile, or its lease
    /// ran out and another claim took it over.
    fn mark_forwarded(
        &self,
        id: String,
        remote_id: String,
        remote_url: Option<String>,
        attempts: u32,
        lease_until: i64,
    ) -> StoreFuture<'_, bool>;
    /// Records a failed attempt under the claim ending at `lease_until`: retried at
    /// `retry_at_ms`, or failed for good with `None`; `false` (nothing written) if the
    /// upload was deleted or claimed again meanwhile.
    fn mark_attempt_failed(
        &self,
        id: String,
        error: String,
        attempts: u32,
        retry_at_ms: Option<i64>,
        lease_until: i64,
    ) -> StoreFuture<'_, bool>;
    /// Notes on upload `id` that a delivery was made twice because a lease ran out (kept
    /// by the delivery that is recorded).
    fn note_superseded(&self, id: String, note: String) -> StoreFuture<'_, ()>;
    /// Claims up to `limit` uploads due at `now`, leased for `lease_ms`; the claim's
    /// `lease_until` is its fencing token. A shared store compares and leases on its own
    /// clock (`now` only says where this node's clock stands), so that nodes whose clocks
    /// disagree never take each other's leases early.
    fn claim_due(&self, now: i64, limit: usize, lease_ms: i64) -> StoreFuture<'_, Claim>;
    /// Makes every leased upload due again and ends every sync delivery's lease (at start:
    /// this node's leases died with it; a no-op where nodes share the store).
    fn release_outbox_leases(&self) -> StoreFuture<'_, usize>;
    /// Uploads waiting for delivery.
    fn outbox_len(&self) -> StoreFuture<'_, u64>;

    // usage
    /// A tenant's usage on `day`: (bytes, uploads).
    fn usage(&self, tenant: String, day: i64) -> StoreFuture<'_, (u64, u64)>;
    /// Adds usage if it stays within `limits`; `false` (adding nothing) if it would not.
    fn try_add_usage(
        &self,
        tenant: String,
        day: i64,
        bytes: u64,
        uploads: u64,
        limits: (Option<u64>, Option<u64>),
    ) -> StoreFuture<'_, bool>;
    /// Gives back usage counted for uploads that were not kept.
    fn refund_usage(&self, tenant: String, day: i64, bytes: u64, uploads: u64) -> StoreFuture<'_, ()>;

    // sessions
    /// Inserts a session with its chunks (none for a new one; a resumable upload received
    /// whole in its creation request comes with its one chunk and its upload record).
    fn insert_session(&self, session: SessionRecord) -> StoreFuture<'_, ()>;
    /// `tenant`'s session `id` with its chunks, `None` for another tenant's.
    fn session_of(&self, tenant: String, id: String) -> StoreFuture<'_, Option<SessionRecord>>;
    /// Records chunk `chunk_number` of a session (replacing an earlier copy).
    fn put_chunk(&self, session_id: String, chunk_number: u64, size: u64) -> StoreFuture<'_, ()>;
    fn delete_session(&self, id: String) -> StoreFuture<'_, ()>;
    /// Sets the length of a session whose length was deferred.
    fn set_session_length(&self, id: String, length: u64) -> StoreFuture<'_, ()>;
    /// Takes (or, for the same `holder`, renews) the lease on session `id` until `until_ms`;
    /// `false` while another holder's lease runs at `now`. A store that one process uses
    /// alone grants every lease; a shared one moves both times onto its own clock.
    fn lease_session(&self, id: String, holder: String, now: i64, until_ms: i64) -> StoreFuture<'_, bool>;
    /// Ends `holder`'s lease on session `id`.
    fn release_session_lease(&self, id: String, holder: String) -> StoreFuture<'_, ()>;
    /// Whether other processes share this store (and leases mean something).
    fn is_shared(&self) -> bool;
    /// Notes the upload record a session became (a tus upload, once complete) or is becoming
    /// (a Kore session, while `complete` runs); `None` takes the note back. A session with a
    /// note is no longer counted open.
    fn set_session_upload(&self, id: String, upload_id: Option<String>) -> StoreFuture<'_, ()>;
    /// Deletes sessions expired at `now` and returns their ids.
    fn take_expired_sessions(&self, now: i64) -> StoreFuture<'_, Vec<String>>;
    fn session_ids(&self) -> StoreFuture<'_, Vec<String>>;
    /// Every session with its chunks (operator listings).
    fn list_sessions(&self) -> StoreFuture<'_, Vec<SessionRecord>>;
    /// Sessions (Kore sessions and tus uploads, finished ones kept until they expire
    /// included) and the bytes of the chunks recorded for them: what `data_dir/sessions`
    /// holds, beside the spool.
    fn session_totals(&self) -> StoreFuture<'_, (u64, u64)>;
    /// `tenant`'s sessions that have not become an upload yet.
    fn open_sessions_of(&self, tenant: String) -> StoreFuture<'_, u64>;
    /// The identity drawn when this store was made (32 hex digits): a shared spool's prefix
    /// belongs to one store, and a node whose store is another is not let near it.
    fn identity(&self) -> StoreFuture<'_, String>;
}

/// Uploads claimed for delivery by one [`Store::claim_due`], all under one lease.
#[derive(Debug, Clone, Default)]
pub(crate) struct Claim {
    /// Oldest due first.
    pub(crate) due: Vec<UploadRecord>,
    /// When the lease ends, on the store's clock: the fencing token that what a delivery
    /// under this claim records must present.
    pub(crate) lease_until: i64,
}

/// The stores' shared check of a row edited to a negative `size` (id `negative`) or an
/// unknown dialect (id `future`): reading it is an error, never a wrapped value, and a
/// listing that meets one fails naming it.
#[cfg(test)]
pub(crate) async fn assert_unreadable_rows_are_errors_naming_them(store: &dyn Store) {
    assert!(
        store.upload("negative".into()).await.is_err(),
        "never a wrapped size"
    );
    let all = UploadFilter {
        limit: 10,
        ..Default::default()
    };
    let error = store.list_uploads(all).await.unwrap_err().to_string();
    assert!(error.contains("cannot be read"), "{error}");
    assert!(
        error.contains("negative") || error.contains("future"),
        "the row is named: {error}"
    );
}

/// `impl Store for $store`, each method the backend's inherent async method of the same name,
/// boxed: one list of the trait's methods for every backend.
macro_rules! store_by_inherent_methods {
    ($store:ident) => {
        $crate::store::store_by_inherent_methods!(@methods $store {
        insert_uploads(records: Vec<$crate::store::UploadRecord>, due_ms: i64) -> ();
        record_outcomes(records: Vec<$crate::store::UploadRecord>) -> usize;
        fail_interrupted_deliveries(now: i64, reason: String) -> Vec<$crate::store::UploadRecord>;
        spooled_ids() -> std::collections::HashSet<String>;
        mark_deleted(id: String) -> bool;
        upload(id: String) -> Option<$crate::store::UploadRecord>;
        upload_of(tenant: String, id: String) -> Option<$crate::store::UploadRecord>;
        list_uploads(filter: $crate::store::UploadFilter) -> Vec<$crate::store::UploadRecord>;
        retry_upload(id: String) -> bool;
        mark_forwarded(id: String, remote_id: String, remote_url: Option<String>, attempts: u32, lease_until: i64) -> bool;
        mark_attempt_failed(id: String, error: String, attempts: u32, retry_at_ms: Option<i64>, lease_until: i64) -> bool;
        note_superseded(id: String, note: String) -> ();
        claim_due(now: i64, limit: usize, lease_ms: i64) -> $crate::store::Claim;
        release_outbox_leases() -> usize;
        outbox_len() -> u64;
        usage(tenant: String, day: i64) -> (u64, u64);
        try_add_usage(tenant: String, day: i64, bytes: u64, uploads: u64, limits: (Option<u64>, Option<u64>)) -> bool;
        refund_usage(tenant: String, day: i64, bytes: u64, uploads: u64) -> ();
        insert_session(session: $crate::store::SessionRecord) -> ();
        session_of(tenant: String, id: String) -> Option<$crate::store::SessionRecord>;
        put_chunk(session_id: String, chunk_number: u64, size: u64) -> ();
        delete_session(id: String) -> ();
        set_session_length(id: String, length: u64) -> ();
        lease_session(id: String, holder: String, now: i64, until_ms: i64) -> bool;
        release_session_lease(id: String, holder: String) -> ();
        set_session_upload(id: String, upload_id: Option<String>) -> ();
        take_expired_sessions(now: i64) -> Vec<String>;
        session_ids() -> Vec<String>;
        list_sessions() -> Vec<$crate::store::SessionRecord>;
        session_totals() -> (u64, u64);
        open_sessions_of(tenant: String) -> u64;
        identity() -> String;
        });
    };
    (@methods $store:ident { $($name:ident($($arg:ident: $ty:ty),*) -> $out:ty;)* }) => {
        impl $crate::store::Store for $store {
            fn is_shared(&self) -> bool {
                $store::SHARED
            }
            $(fn $name(&self, $($arg: $ty),*) -> $crate::store::StoreFuture<'_, $out> {
                Box::pin($store::$name(self, $($arg),*))
            })*
        }
    };
}
pub(crate) use store_by_inherent_methods;
