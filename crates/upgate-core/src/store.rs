//! The store: upload records, chunked sessions, daily usage and the delivery outbox, in
//! SQLite.
//!
//! What flows through here: closures over a `rusqlite::Connection`, sent from async handlers
//! to one dedicated store thread and answered through oneshot channels, so SQLite never
//! blocks an async worker. The thread commits in groups: it runs every job waiting in the
//! queue inside one transaction (each job in its own savepoint, so one failing job does not
//! undo the others) and answers the callers only after the commit. The database is in WAL
//! mode; schema changes are versioned migrations keyed on `PRAGMA user_version`.

use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use tokio::sync::oneshot;

use crate::config::Durability;

/// Most jobs committed in one transaction.
const MAX_GROUP: usize = 512;
/// How often the WAL is checkpointed into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(500);

/// A store failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sqlite(String),
    #[error("the store thread has stopped")]
    Closed,
    #[error("cannot open the database at {path}: {message}")]
    Open { path: String, message: String },
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        Self::Sqlite(error.to_string())
    }
}

/// Migrations, applied in order; index + 1 is the schema version after it.
const MIGRATIONS: &[&str] = &[
    // 1: uploads.
    "CREATE TABLE uploads (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        dialect TEXT NOT NULL,
        filename TEXT NOT NULL,
        extension TEXT NOT NULL,
        mime TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('received', 'forwarded', 'failed', 'deleted')),
        provider TEXT NOT NULL,
        remote_id TEXT,
        remote_url TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) WITHOUT ROWID;",
    // 2: delivery bookkeeping and the outbox.
    "ALTER TABLE uploads ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE uploads ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE uploads ADD COLUMN last_error TEXT;
    ALTER TABLE uploads ADD COLUMN next_attempt_at INTEGER;
    CREATE INDEX uploads_outbox ON uploads (next_attempt_at) WHERE next_attempt_at IS NOT NULL;",
    // 3: chunked sessions.
    "CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        dialect TEXT NOT NULL,
        filename TEXT NOT NULL,
        extension TEXT NOT NULL,
        declared_size INTEGER NOT NULL,
        total_chunks INTEGER NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    );
    CREATE INDEX sessions_expiry ON sessions (expires_at);
    CREATE TABLE session_chunks (
        session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        chunk_number INTEGER NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (session_id, chunk_number)
    );",
    // 4: daily usage per tenant, for quotas.
    "CREATE TABLE usage (
        tenant TEXT NOT NULL,
        day INTEGER NOT NULL,
        bytes INTEGER NOT NULL DEFAULT 0,
        uploads INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, day)
    );",
    // 5: the state check spelled with `=`: SQLite evaluates `state IN (...)` by building a
    // throw-away b-tree for the list on every insert and update, which was half the cost of
    // recording an upload. SQLite cannot alter a CHECK, so the table is rebuilt.
    "CREATE TABLE uploads_v5 (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        dialect TEXT NOT NULL,
        filename TEXT NOT NULL,
        extension TEXT NOT NULL,
        mime TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state = 'received' OR state = 'forwarded' OR state = 'failed'
            OR state = 'deleted'),
        provider TEXT NOT NULL,
        remote_id TEXT,
        remote_url TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        next_attempt_at INTEGER
    ) WITHOUT ROWID;
    INSERT INTO uploads_v5 (id, tenant, dialect, filename, extension, mime, size, sha256, state,
        provider, remote_id, remote_url, created_at, updated_at, metadata, attempts, last_error,
        next_attempt_at)
    SELECT id, tenant, dialect, filename, extension, mime, size, sha256, state, provider,
        remote_id, remote_url, created_at, updated_at, metadata, attempts, last_error,
        next_attempt_at
    FROM uploads;
    DROP TABLE uploads;
    ALTER TABLE uploads_v5 RENAME TO uploads;
    CREATE INDEX uploads_outbox ON uploads (next_attempt_at) WHERE next_attempt_at IS NOT NULL;",
];

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Where an upload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UploadState {
    /// Stored here, not (yet) delivered upstream.
    Received,
    Forwarded,
    Failed,
    Deleted,
}

impl UploadState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Received => "received",
            Self::Forwarded => "forwarded",
            Self::Failed => "failed",
            Self::Deleted => "deleted",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "forwarded" => Self::Forwarded,
            "failed" => Self::Failed,
            "deleted" => Self::Deleted,
            _ => Self::Received,
        }
    }
}

/// One row of `uploads`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UploadRecord {
    pub id: String,
    pub tenant: String,
    pub dialect: String,
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

const UPLOAD_COLUMNS: &str = "id, tenant, dialect, filename, extension, mime, size, sha256, state, provider, \
     remote_id, remote_url, metadata, attempts, last_error, created_at, updated_at";

fn upload_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<UploadRecord> {
    let metadata: String = row.get(12)?;
    Ok(UploadRecord {
        id: row.get(0)?,
        tenant: row.get(1)?,
        dialect: row.get(2)?,
        filename: row.get(3)?,
        extension: row.get(4)?,
        mime: row.get(5)?,
        size: row.get::<_, i64>(6)? as u64,
        sha256: row.get(7)?,
        state: UploadState::parse(&row.get::<_, String>(8)?),
        provider: row.get(9)?,
        remote_id: row.get(10)?,
        remote_url: row.get(11)?,
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        attempts: row.get::<_, i64>(13)? as u32,
        last_error: row.get(14)?,
        created_at_ms: row.get(15)?,
        updated_at_ms: row.get(16)?,
    })
}

/// One row of `sessions`, with the chunks received so far.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub id: String,
    pub tenant: String,
    pub dialect: String,
    pub filename: String,
    pub extension: String,
    pub declared_size: u64,
    pub total_chunks: u64,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    /// (chunk number, size), ordered by chunk number.
    pub chunks: Vec<(u64, u64)>,
}

impl SessionRecord {
    pub fn received_bytes(&self) -> u64 {
        self.chunks.iter().map(|(_, size)| size).sum()
    }
}

type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;
/// A unit of store work. The flag says whether it shares its transaction with other jobs
/// (then it runs in its own savepoint, so its failure undoes only its own writes).
type Job = Box<dyn FnOnce(&Connection, bool) -> Reply + Send>;

/// Handle to the store thread. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
    /// Dropped with the last handle: tells the checkpoint thread to stop.
    _checkpoints: Arc<mpsc::Sender<()>>,
}

impl Store {
    /// Opens (creating and migrating) `upgate.db` in `data_dir` and starts the store thread.
    pub fn open(data_dir: &Path, durability: Durability) -> Result<Self, StoreError> {
        let path = data_dir.join("upgate.db");
        let open_error = |message: String| StoreError::Open {
            path: path.display().to_string(),
            message,
        };
        let mut connection = Connection::open(&path).map_err(|e| open_error(e.to_string()))?;
        let synchronous = match durability {
            Durability::ProcessCrash => "NORMAL",
            Durability::PowerLoss => "FULL",
        };
        connection
            .execute_batch(&format!(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; PRAGMA foreign_keys = ON;
                 PRAGMA busy_timeout = 5000; PRAGMA cache_size = -8192;"
            ))
            .map_err(|e| open_error(e.to_string()))?;
        migrate(&mut connection).map_err(|e| open_error(e.to_string()))?;
        // Checkpoints (which fsync the database file) run on their own connection and
        // thread, so a slow disk never stalls the commits clients are waiting for.
        connection
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| open_error(e.to_string()))?;
        let checkpointer = Connection::open(&path).map_err(|e| open_error(e.to_string()))?;
        let (checkpoints, stop) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("upgate-checkpoint".into())
            .spawn(move || run_checkpoints(checkpointer, stop))
            .map_err(|e| open_error(e.to_string()))?;
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("upgate-store".into())
            .spawn(move || run_store_thread(connection, queue))
            .map_err(|e| open_error(e.to_string()))?;
        Ok(Self {
            jobs,
            _checkpoints: Arc::new(checkpoints),
        })
    }

    /// Runs `work` on the store thread inside the current group transaction and returns its
    /// result once that transaction has committed.
    pub async fn call<T, F>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let job: Job = Box::new(move |connection, shared| {
            let result = if shared {
                run_in_savepoint(connection, work)
            } else {
                work(connection)
            };
            Box::new(move |commit_error| {
                let result = match commit_error {
                    Some(error) => Err(error.clone()),
                    None => result,
                };
                let _ = answer.send(result);
            })
        });
        self.jobs.send(job).map_err(|_| StoreError::Closed)?;
        answered.await.map_err(|_| StoreError::Closed)?
    }

    /// Inserts upload records. Those in state `received` enter the outbox, due at
    /// `deliver_at_ms`; the others (a sync delivery's final state) do not.
    pub async fn insert_uploads(
        &self,
        records: Vec<UploadRecord>,
        deliver_at_ms: i64,
    ) -> Result<(), StoreError> {
        self.call(move |connection| {
            let mut statement = connection.prepare_cached(
                "INSERT INTO uploads (id, tenant, dialect, filename, extension, mime, size, sha256, state,
                 provider, remote_id, remote_url, metadata, attempts, last_error, created_at, updated_at,
                 next_attempt_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
            )?;
            for record in &records {
                statement.execute(params![
                    record.id,
                    record.tenant,
                    record.dialect,
                    record.filename,
                    record.extension,
                    record.mime,
                    record.size as i64,
                    record.sha256,
                    record.state.as_str(),
                    record.provider,
                    record.remote_id,
                    record.remote_url,
                    serde_json::Value::Object(record.metadata.clone()).to_string(),
                    record.attempts,
                    record.last_error,
                    record.created_at_ms,
                    record.updated_at_ms,
                    (record.state == UploadState::Received).then_some(deliver_at_ms),
                ])?;
            }
            Ok(())
        })
        .await
    }

    /// Records an async delivery: state forwarded, remote id and URL. Only an upload still
    /// waiting (`received`) changes; `false` means it was deleted while it was in flight.
    pub async fn mark_forwarded(
        &self,
        id: String,
        remote_id: String,
        remote_url: Option<String>,
        attempts: u32,
    ) -> Result<bool, StoreError> {
        self.call(move |connection| {
            let changed = connection.execute(
                "UPDATE uploads SET state = 'forwarded', remote_id = ?2, remote_url = ?3, attempts = ?4,
                 last_error = NULL, next_attempt_at = NULL, updated_at = ?5 WHERE id = ?1 AND state = 'received'",
                params![id, remote_id, remote_url, attempts, now_ms()],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    /// Records a failed attempt of an upload still waiting (a deleted one stays deleted).
    /// With `retry_at`, the upload stays `received` and in the outbox; without, it is
    /// `failed` for good.
    pub async fn mark_attempt_failed(
        &self,
        id: String,
        error: String,
        attempts: u32,
        retry_at_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        self.call(move |connection| {
            let state = if retry_at_ms.is_some() {
                "received"
            } else {
                "failed"
            };
            connection.execute(
                "UPDATE uploads SET state = ?2, last_error = ?3, attempts = ?4, next_attempt_at = ?5,
                 updated_at = ?6 WHERE id = ?1 AND state = 'received'",
                params![id, state, error, attempts, retry_at_ms, now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    /// Ids of the uploads whose bytes belong in the spool: waiting for async delivery, or
    /// failed after it (kept for the operator).
    pub async fn spooled_ids(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        self.call(|connection| {
            let mut statement =
                connection.prepare_cached("SELECT id FROM uploads WHERE state IN ('received', 'failed')")?;
            Ok(statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn mark_deleted(&self, id: String) -> Result<(), StoreError> {
        self.call(move |connection| {
            connection.execute(
                "UPDATE uploads SET state = 'deleted', next_attempt_at = NULL, updated_at = ?2 WHERE id = ?1",
                params![id, now_ms()],
            )?;
            Ok(())
        })
        .await
    }

    /// An upload by id, whoever's it is (operator commands).
    pub async fn upload(&self, id: String) -> Result<Option<UploadRecord>, StoreError> {
        self.call(move |connection| {
            Ok(connection
                .query_row(
                    &format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = ?1"),
                    params![id],
                    upload_from_row,
                )
                .optional()?)
        })
        .await
    }

    /// An upload by id, only if it belongs to `tenant`.
    pub async fn upload_of(&self, tenant: String, id: String) -> Result<Option<UploadRecord>, StoreError> {
        self.call(move |connection| {
            Ok(connection
                .query_row(
                    &format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = ?1 AND tenant = ?2"),
                    params![id, tenant],
                    upload_from_row,
                )
                .optional()?)
        })
        .await
    }

    /// Uploads due for delivery, claimed: their next attempt is pushed `lease_ms` ahead so a
    /// second poll does not pick them up while they are in flight.
    pub async fn claim_due(
        &self,
        now: i64,
        limit: usize,
        lease_ms: i64,
    ) -> Result<Vec<UploadRecord>, StoreError> {
        self.call(move |connection| {
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE next_attempt_at IS NOT NULL
                 AND next_attempt_at <= ?1 AND state = 'received' ORDER BY next_attempt_at LIMIT ?2"
            ))?;
            let due = statement
                .query_map(params![now, limit as i64], upload_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            let mut lease =
                connection.prepare_cached("UPDATE uploads SET next_attempt_at = ?2 WHERE id = ?1")?;
            for record in &due {
                lease.execute(params![record.id, now + lease_ms])?;
            }
            Ok(due)
        })
        .await
    }

    /// At start: the leases of a previous process are void (nothing of it is in flight any
    /// more), so every waiting upload is due now instead of when its lease would run out.
    pub async fn release_outbox_leases(&self) -> Result<usize, StoreError> {
        self.call(|connection| {
            Ok(connection.execute(
                "UPDATE uploads SET next_attempt_at = ?1 WHERE state = 'received'
                 AND next_attempt_at IS NOT NULL AND next_attempt_at > ?1",
                params![now_ms()],
            )?)
        })
        .await
    }

    /// Number of uploads waiting in the outbox.
    pub async fn outbox_len(&self) -> Result<u64, StoreError> {
        self.call(|connection| {
            Ok(connection.query_row(
                "SELECT COUNT(*) FROM uploads WHERE next_attempt_at IS NOT NULL AND state = 'received'",
                [],
                |row| row.get::<_, i64>(0),
            )? as u64)
        })
        .await
    }

    /// Today's usage of a tenant: (bytes, uploads).
    pub async fn usage(&self, tenant: String, day: i64) -> Result<(u64, u64), StoreError> {
        self.call(move |connection| {
            Ok(connection
                .query_row(
                    "SELECT bytes, uploads FROM usage WHERE tenant = ?1 AND day = ?2",
                    params![tenant, day],
                    |row| Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64)),
                )
                .optional()?
                .unwrap_or((0, 0)))
        })
        .await
    }

    /// Adds to today's usage if it stays within the limits; returns false (adding nothing)
    /// when it would not.
    pub async fn try_add_usage(
        &self,
        tenant: String,
        day: i64,
        bytes: u64,
        uploads: u64,
        limits: (Option<u64>, Option<u64>),
    ) -> Result<bool, StoreError> {
        self.call(move |connection| {
            let (used_bytes, used_uploads): (i64, i64) = connection
                .query_row(
                    "SELECT bytes, uploads FROM usage WHERE tenant = ?1 AND day = ?2",
                    params![tenant, day],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?
                .unwrap_or((0, 0));
            let over_bytes = limits.0.is_some_and(|limit| used_bytes as u64 + bytes > limit);
            let over_uploads = limits
                .1
                .is_some_and(|limit| used_uploads as u64 + uploads > limit);
            if over_bytes || over_uploads {
                return Ok(false);
            }
            connection.execute(
                "INSERT INTO usage (tenant, day, bytes, uploads) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (tenant, day) DO UPDATE SET bytes = bytes + ?3, uploads = uploads + ?4",
                params![tenant, day, bytes as i64, uploads as i64],
            )?;
            Ok(true)
        })
        .await
    }

    /// Gives back usage [`Store::try_add_usage`] counted for uploads that were not kept.
    pub async fn refund_usage(
        &self,
        tenant: String,
        day: i64,
        bytes: u64,
        uploads: u64,
    ) -> Result<(), StoreError> {
        self.call(move |connection| {
            connection.execute(
                "UPDATE usage SET bytes = max(0, bytes - ?3), uploads = max(0, uploads - ?4)
                 WHERE tenant = ?1 AND day = ?2",
                params![tenant, day, bytes as i64, uploads as i64],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn insert_session(&self, session: SessionRecord) -> Result<(), StoreError> {
        self.call(move |connection| {
            connection.execute(
                "INSERT INTO sessions (id, tenant, dialect, filename, extension, declared_size, total_chunks,
                 metadata, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    session.id,
                    session.tenant,
                    session.dialect,
                    session.filename,
                    session.extension,
                    session.declared_size as i64,
                    session.total_chunks as i64,
                    serde_json::Value::Object(session.metadata).to_string(),
                    session.created_at_ms,
                    session.expires_at_ms,
                ],
            )?;
            Ok(())
        })
        .await
    }

    /// A session by id, only if it belongs to `tenant`.
    pub async fn session_of(&self, tenant: String, id: String) -> Result<Option<SessionRecord>, StoreError> {
        self.call(move |connection| {
            let session = connection
                .query_row(
                    "SELECT id, tenant, dialect, filename, extension, declared_size, total_chunks, metadata,
                     created_at, expires_at FROM sessions WHERE id = ?1 AND tenant = ?2",
                    params![id, tenant],
                    |row| {
                        let metadata: String = row.get(7)?;
                        Ok(SessionRecord {
                            id: row.get(0)?,
                            tenant: row.get(1)?,
                            dialect: row.get(2)?,
                            filename: row.get(3)?,
                            extension: row.get(4)?,
                            declared_size: row.get::<_, i64>(5)? as u64,
                            total_chunks: row.get::<_, i64>(6)? as u64,
                            metadata: serde_json::from_str(&metadata).unwrap_or_default(),
                            created_at_ms: row.get(8)?,
                            expires_at_ms: row.get(9)?,
                            chunks: Vec::new(),
                        })
                    },
                )
                .optional()?;
            let Some(mut session) = session else {
                return Ok(None);
            };
            let mut statement = connection.prepare_cached(
                "SELECT chunk_number, size FROM session_chunks WHERE session_id = ?1 ORDER BY chunk_number",
            )?;
            session.chunks = statement
                .query_map(params![session.id], |row| {
                    Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64))
                })?
                .collect::<Result<_, _>>()?;
            Ok(Some(session))
        })
        .await
    }

    /// Records a chunk (replacing an earlier copy of the same number).
    pub async fn put_chunk(
        &self,
        session_id: String,
        chunk_number: u64,
        size: u64,
    ) -> Result<(), StoreError> {
        self.call(move |connection| {
            connection.execute(
                "INSERT INTO session_chunks (session_id, chunk_number, size) VALUES (?1, ?2, ?3)
                 ON CONFLICT (session_id, chunk_number) DO UPDATE SET size = ?3",
                params![session_id, chunk_number as i64, size as i64],
            )?;
            Ok(())
        })
        .await
    }

    pub async fn delete_session(&self, id: String) -> Result<(), StoreError> {
        self.call(move |connection| {
            connection.execute("DELETE FROM sessions WHERE id = ?1", params![id])?;
            Ok(())
        })
        .await
    }

    /// Deletes the sessions expired at `now` and returns their ids (their chunk files are
    /// the caller's to remove).
    pub async fn take_expired_sessions(&self, now: i64) -> Result<Vec<String>, StoreError> {
        self.call(move |connection| {
            let mut statement =
                connection.prepare_cached("DELETE FROM sessions WHERE expires_at <= ?1 RETURNING id")?;
            Ok(statement
                .query_map(params![now], |row| row.get(0))?
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    /// All session ids (for cleaning chunk directories left without a session).
    pub async fn session_ids(&self) -> Result<Vec<String>, StoreError> {
        self.call(|connection| {
            let mut statement = connection.prepare_cached("SELECT id FROM sessions")?;
            Ok(statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    pub async fn active_sessions(&self) -> Result<u64, StoreError> {
        self.call(|connection| {
            Ok(connection.query_row("SELECT COUNT(*) FROM sessions", [], |row| row.get::<_, i64>(0))? as u64)
        })
        .await
    }
}

fn migrate(connection: &mut Connection) -> rusqlite::Result<()> {
    let version: usize =
        connection.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))? as usize;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        let transaction = connection.transaction()?;
        transaction.execute_batch(migration)?;
        transaction.pragma_update(None, "user_version", (index + 1) as i64)?;
        transaction.commit()?;
    }
    Ok(())
}

fn run_in_savepoint<T>(
    connection: &Connection,
    work: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    run(connection, "SAVEPOINT job")?;
    let result = work(connection);
    if result.is_err() {
        run(connection, "ROLLBACK TO job")?;
    }
    run(connection, "RELEASE job")?;
    result
}

/// Runs a statement from the connection's cache of prepared statements.
fn run(connection: &Connection, sql: &str) -> rusqlite::Result<()> {
    connection.prepare_cached(sql)?.execute([]).map(|_| ())
}

/// Copies the WAL back into the database every [`CHECKPOINT_EVERY`] without blocking the
/// writer (PASSIVE), until every [`Store`] handle is gone.
fn run_checkpoints(connection: Connection, stop: mpsc::Receiver<()>) {
    let _ = connection.busy_timeout(std::time::Duration::from_secs(5));
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
        if let Err(error) = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(%error, "WAL checkpoint failed");
        }
    }
}

fn run_store_thread(connection: Connection, queue: mpsc::Receiver<Job>) {
    let mut jobs = Vec::with_capacity(MAX_GROUP);
    while let Ok(first) = queue.recv() {
        jobs.push(first);
        while jobs.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let shared = jobs.len() > 1;
        let began = run(&connection, "BEGIN IMMEDIATE");
        let replies: Vec<Reply> = jobs.drain(..).map(|job| job(&connection, shared)).collect();
        let committed = began
            .and_then(|()| run(&connection, "COMMIT"))
            .map_err(StoreError::from);
        if committed.is_err() {
            let _ = connection.execute_batch("ROLLBACK");
        }
        let commit_error = committed.err();
        for reply in replies {
            reply(commit_error.as_ref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, tenant: &str) -> UploadRecord {
        UploadRecord {
            id: id.into(),
            tenant: tenant.into(),
            dialect: "dify".into(),
            filename: "a.txt".into(),
            extension: "txt".into(),
            mime: "text/plain".into(),
            size: 3,
            sha256: "00".into(),
            state: UploadState::Received,
            provider: "disk".into(),
            remote_id: None,
            remote_url: None,
            metadata: Default::default(),
            attempts: 0,
            last_error: None,
            created_at_ms: 1,
            updated_at_ms: 1,
        }
    }

    #[tokio::test]
    async fn records_follow_their_state_and_stay_with_their_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::ProcessCrash).unwrap();
        store.insert_uploads(vec![record("a", "t1")], 1).await.unwrap();
        // A duplicate id fails alone; the group's other jobs still commit.
        let (dup, other) = tokio::join!(
            store.insert_uploads(vec![record("a", "t1")], 1),
            store.insert_uploads(vec![record("b", "t1")], 1)
        );
        assert!(dup.is_err());
        other.unwrap();
        assert_eq!(store.outbox_len().await.unwrap(), 2);
        store
            .mark_forwarded("a".into(), "r1".into(), Some("http://x".into()), 1)
            .await
            .unwrap();
        let got = store.upload_of("t1".into(), "a".into()).await.unwrap().unwrap();
        assert_eq!(got.state, UploadState::Forwarded);
        assert_eq!(got.remote_id.as_deref(), Some("r1"));
        assert!(store.upload_of("t2".into(), "a".into()).await.unwrap().is_none());
        assert_eq!(store.outbox_len().await.unwrap(), 1);
        let due = store.claim_due(i64::MAX - 10, 10, 5).await.unwrap();
        assert_eq!(due.len(), 1);
        assert!(store.claim_due(0, 10, 5).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn usage_limits_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), Durability::PowerLoss).unwrap();
            assert!(
                store
                    .try_add_usage("t".into(), 5, 10, 1, (Some(15), Some(5)))
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .try_add_usage("t".into(), 5, 10, 1, (Some(15), Some(5)))
                    .await
                    .unwrap()
            );
            assert!(
                store
                    .try_add_usage("t".into(), 5, 5, 1, (Some(15), Some(5)))
                    .await
                    .unwrap()
            );
        }
        let store = Store::open(dir.path(), Durability::ProcessCrash).unwrap();
        assert_eq!(store.usage("t".into(), 5).await.unwrap(), (15, 2));
    }

    #[tokio::test]
    async fn sessions_and_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Durability::ProcessCrash).unwrap();
        let session = SessionRecord {
            id: "s".into(),
            tenant: "t".into(),
            dialect: "kore".into(),
            filename: "f.mp3".into(),
            extension: "mp3".into(),
            declared_size: 10,
            total_chunks: 2,
            metadata: Default::default(),
            created_at_ms: 0,
            expires_at_ms: 100,
            chunks: vec![],
        };
        store.insert_session(session).await.unwrap();
        store.put_chunk("s".into(), 1, 4).await.unwrap();
        store.put_chunk("s".into(), 1, 5).await.unwrap();
        let got = store.session_of("t".into(), "s".into()).await.unwrap().unwrap();
        assert_eq!(got.chunks, vec![(1, 5)]);
        assert!(
            store
                .session_of("other".into(), "s".into())
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            store.take_expired_sessions(99).await.unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            store.take_expired_sessions(100).await.unwrap(),
            vec!["s".to_string()]
        );
        assert!(store.session_of("t".into(), "s".into()).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_version_4_database_keeps_its_uploads_and_records_them_without_a_temporary_btree() {
        let dir = tempfile::tempdir().unwrap();
        {
            let connection = Connection::open(dir.path().join("upgate.db")).unwrap();
            for migration in &MIGRATIONS[..4] {
                connection.execute_batch(migration).unwrap();
            }
            connection.pragma_update(None, "user_version", 4).unwrap();
            connection
                .execute(
                    "INSERT INTO uploads (id, tenant, dialect, filename, extension, mime, size, sha256,
                     state, provider, created_at, updated_at, metadata, attempts, next_attempt_at)
                     VALUES ('old', 't', 'dify', 'a.txt', 'txt', 'text/plain', 3, '00', 'received',
                     'disk', 1, 2, '{\"user\":\"u\"}', 4, 5)",
                    [],
                )
                .unwrap();
        }
        let store = Store::open(dir.path(), Durability::ProcessCrash).unwrap();
        let old = store
            .upload("old".into())
            .await
            .unwrap()
            .expect("the old row survives");
        assert_eq!((old.size, old.attempts, old.updated_at_ms), (3, 4, 2));
        assert_eq!(old.metadata.get("user").and_then(|v| v.as_str()), Some("u"));
        assert_eq!(store.outbox_len().await.unwrap(), 1, "its outbox entry too");
        drop(store);

        let connection = Connection::open(dir.path().join("upgate.db")).unwrap();
        let version: i64 = connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version as usize, MIGRATIONS.len());
        let bad_state = connection.execute(
            "INSERT INTO uploads (id, tenant, dialect, filename, extension, mime, size, sha256, state,
             provider, created_at, updated_at) VALUES ('x', 't', 'dify', 'a', '', 'm', 0, '', 'lost', 'p', 0, 0)",
            [],
        );
        assert!(bad_state.is_err(), "the state check still holds");
        let mut explain = connection
            .prepare(
                "EXPLAIN INSERT INTO uploads (id, tenant, dialect, filename, extension, mime, size, sha256,
                 state, provider, created_at, updated_at) VALUES ('y', 't', 'dify', 'a', '', 'm', 0, '', 'received', 'p', 0, 0)",
            )
            .unwrap();
        let opcodes: Vec<String> = explain
            .query_map([], |row| row.get::<_, String>(1))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(
            !opcodes.iter().any(|op| op == "OpenEphemeral"),
            "an insert builds no temporary b-tree: {opcodes:?}"
        );
    }
}
