//! The SQLite store, the embedded default behind [`crate::store::Store`]: one file,
//! `<data_dir>/upgate.db`, one table per file beside this one.
//!
//! What flows through here: closures over a `rusqlite::Connection`, sent from async handlers
//! to one dedicated store thread and answered through oneshot channels, so SQLite never
//! blocks an async worker. The thread commits in groups: it runs every job waiting in the
//! queue inside one transaction (each job in its own savepoint, so one failing job does not
//! undo the others) and answers the callers only after the commit. The database is in WAL
//! mode; schema changes are versioned migrations keyed on `PRAGMA user_version`. The WAL is
//! copied back by a checkpoint thread of its own; under a load that never pauses those
//! checkpoints cannot finish (frames keep coming), so the WAL could grow without bound: past
//! [`WalBounds::limit`] the store thread checkpoints it itself between two commits, and the
//! file is cut back to [`WalBounds::keep`] when the WAL starts over.

mod migrations;
mod outbox;
mod sessions;
#[cfg(test)]
mod tests;
mod uploads;
mod usage;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::StoreError;
use crate::config::Durability;
use migrations::MIGRATIONS;

/// Most jobs committed in one transaction.
const MAX_GROUP: usize = 512;

/// When the WAL is copied back into the database file, and how large it may grow.
#[derive(Debug, Clone, Copy)]
struct WalBounds {
    /// How often the checkpoint thread copies it back without blocking the writer (PASSIVE).
    checkpoint_every: Duration,
    /// Past this size (bytes) the store thread checkpoints it itself between two commits, so
    /// that everything is copied back and the WAL can start over (a load that never pauses
    /// keeps the checkpoint thread from ever finishing).
    limit: u64,
    /// How often the store thread looks at the WAL's size.
    look_every: Duration,
    /// What the WAL file is cut back to when it starts over (`journal_size_limit`).
    keep: u64,
}

impl WalBounds {
    const DEFAULT: Self = Self {
        checkpoint_every: Duration::from_millis(500),
        limit: 256 << 20,
        look_every: Duration::from_millis(250),
        keep: 256 << 20,
    };
}

type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;
/// A unit of store work. The flag says whether it shares its transaction with other jobs
/// (then it runs in its own savepoint, so its failure undoes only its own writes); it
/// returns its reply and whether it failed (a job alone in its transaction that failed is
/// rolled back whole).
type Job = Box<dyn FnOnce(&Connection, bool) -> (Reply, bool) + Send>;

/// Handle to the store thread. Cheap to clone.
#[derive(Clone)]
pub(crate) struct SqliteStore {
    /// Dropped with the last handle: the store thread ends, then the checkpoint thread.
    jobs: mpsc::Sender<Job>,
}

impl SqliteStore {
    /// One process (and its operator commands, which take no session) uses the file.
    pub(super) const SHARED: bool = false;

    /// The schema version this upgate migrates `upgate.db` to.
    pub(crate) const SCHEMA_VERSION: usize = MIGRATIONS.len();

    /// The schema version of `upgate.db` in `data_dir`, read without changing anything
    /// (`None`: there is no database yet).
    pub(crate) fn schema_version(data_dir: &Path) -> Result<Option<usize>, StoreError> {
        let path = data_dir.join("upgate.db");
        if !path.exists() {
            return Ok(None);
        }
        let open_error = |error: rusqlite::Error| StoreError::Open {
            path: path.display().to_string(),
            message: error.to_string(),
        };
        let connection = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(open_error)?;
        let version: i64 = connection
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(open_error)?;
        Ok(Some(usize::try_from(version).unwrap_or(usize::MAX)))
    }

    /// Opens (creating and migrating) `upgate.db` in `data_dir` and starts the store thread.
    pub(crate) fn open(data_dir: &Path, durability: Durability) -> Result<Self, StoreError> {
        Self::open_bounded(data_dir, durability, WalBounds::DEFAULT)
    }

    fn open_bounded(data_dir: &Path, durability: Durability, wal: WalBounds) -> Result<Self, StoreError> {
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
                 PRAGMA busy_timeout = 5000; PRAGMA cache_size = -8192; PRAGMA journal_size_limit = {};",
                wal.keep
            ))
            .map_err(|e| open_error(e.to_string()))?;
        migrate(&mut connection).map_err(open_error)?;
        // Checkpoints (which fsync the database file) run on their own connection and
        // thread, so a slow disk never stalls the commits clients are waiting for.
        connection
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| open_error(e.to_string()))?;
        let checkpointer = Connection::open(&path).map_err(|e| open_error(e.to_string()))?;
        let (checkpoints, stop) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("upgate-checkpoint".into())
            .spawn(move || run_checkpoints(checkpointer, stop, wal.checkpoint_every))
            .map_err(|e| open_error(e.to_string()))?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let wal_file = data_dir.join("upgate.db-wal");
        std::thread::Builder::new()
            .name("upgate-store".into())
            .spawn(move || run_store_thread(connection, queue, checkpoints, WalWatch::new(wal_file, wal)))
            .map_err(|e| open_error(e.to_string()))?;
        Ok(Self { jobs })
    }

    /// Runs `work` on the store thread inside the current group transaction and returns its
    /// result once that transaction has committed; a `work` that fails leaves none of its
    /// writes behind.
    pub(crate) async fn call<T, F>(&self, work: F) -> Result<T, StoreError>
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
            let failed = result.is_err();
            let reply: Reply = Box::new(move |commit_error| {
                let result = match (result, commit_error) {
                    (Ok(_), Some(error)) => Err(error.clone()),
                    (result, _) => result,
                };
                let _ = answer.send(result);
            });
            (reply, failed)
        });
        self.jobs.send(job).map_err(|_| StoreError::Closed)?;
        answered.await.map_err(|_| StoreError::Closed)?
    }

    async fn identity(&self) -> Result<String, StoreError> {
        self.call(|connection| {
            Ok(connection.query_row("SELECT id FROM store_identity", [], |row| row.get(0))?)
        })
        .await
    }
}

/// Brings the schema up to date. A database of a newer schema (written by a newer upgate,
/// then downgraded) is refused: this one would read rows it does not know.
fn migrate(connection: &mut Connection) -> Result<(), String> {
    let version = connection
        .query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))
        .map_err(|error| error.to_string())?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(format!(
            "its schema version is {version}, newer than this upgate's {}: a newer upgate wrote it \
             (run that one; a downgrade does not migrate back)",
            MIGRATIONS.len()
        ));
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        let migrated = (|| {
            let transaction = connection.transaction()?;
            transaction.execute_batch(migration)?;
            transaction.pragma_update(None, "user_version", (index + 1) as i64)?;
            transaction.commit()
        })();
        migrated.map_err(|error| error.to_string())?;
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

/// Copies the WAL back into the database every `every` without blocking the writer
/// (PASSIVE), until every [`SqliteStore`] handle is gone.
fn run_checkpoints(connection: Connection, stop: mpsc::Receiver<()>, every: Duration) {
    let _ = connection.busy_timeout(Duration::from_secs(5));
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(every) {
        if let Err(error) = connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(%error, "WAL checkpoint failed");
        }
    }
}

/// Runs jobs until the last handle is gone, then closes its connection and only then lets the
/// checkpoint thread close its own, so the two never close at the same moment (SQLite 3.51.1,
/// bundled by rusqlite 0.38, deadlocked there: a lock-order inversion in the unix VFS, rusqlite
/// issue #1860, which hung every SQLite user in the process; the workspace takes rusqlite 0.39,
/// SQLite 3.51.3, for its fix).
fn run_store_thread(
    connection: Connection,
    queue: mpsc::Receiver<Job>,
    checkpoints: mpsc::Sender<()>,
    mut wal: WalWatch,
) {
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
        let (replies, failed): (Vec<Reply>, Vec<bool>) =
            jobs.drain(..).map(|job| job(&connection, shared)).unzip();
        // A failed job that shared the transaction undid its own writes (its savepoint); one
        // alone in it is undone by rolling the transaction back.
        let committed = if !shared && failed.first() == Some(&true) {
            let _ = connection.execute_batch("ROLLBACK");
            began.map_err(StoreError::from)
        } else {
            let committed = began
                .and_then(|()| run(&connection, "COMMIT"))
                .map_err(StoreError::from);
            if committed.is_err() {
                let _ = connection.execute_batch("ROLLBACK");
            }
            committed
        };
        let commit_error = committed.err();
        for reply in replies {
            reply(commit_error.as_ref());
        }
        wal.after_commit(&connection);
    }
    drop(connection);
    drop(checkpoints);
}

/// The store thread's look at the WAL's size (see [`WalBounds::limit`]).
struct WalWatch {
    file: PathBuf,
    bounds: WalBounds,
    looked: Instant,
}

impl WalWatch {
    fn new(file: PathBuf, bounds: WalBounds) -> Self {
        Self {
            file,
            bounds,
            looked: Instant::now(),
        }
    }

    /// After a commit, at most every `look_every`: a WAL past its limit is checkpointed here,
    /// where no commit can come between, so that all of it is copied back and the next commit
    /// starts it over (cut back to `keep`). A checkpoint thread busy at that moment makes
    /// this one wait for the next look.
    fn after_commit(&mut self, connection: &Connection) {
        if self.looked.elapsed() < self.bounds.look_every {
            return;
        }
        self.looked = Instant::now();
        let size = std::fs::metadata(&self.file).map_or(0, |metadata| metadata.len());
        if size <= self.bounds.limit {
            return;
        }
        match connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
            ))
        }) {
            Ok((busy, frames, copied)) => {
                tracing::info!(
                    wal_bytes = size,
                    busy,
                    frames,
                    copied,
                    "WAL past its limit, checkpointed by the store thread"
                );
            }
            Err(error) => tracing::warn!(%error, "WAL checkpoint failed"),
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> Self {
        match error.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => Self::Full,
            _ => Self::Database(error.to_string()),
        }
    }
}

/// A text column that must hold one of a known set of names (a dialect, a state): a value
/// no version of upgate writes is an error, never a silent default.
fn parse_column<T>(column: usize, text: &str, parse: impl Fn(&str) -> Option<T>) -> rusqlite::Result<T> {
    parse(text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            column,
            rusqlite::types::Type::Text,
            format!("unknown value `{}`", text.chars().take(32).collect::<String>()).into(),
        )
    })
}

/// A row read that a shared check ([`crate::store::stored_metadata`], ...) refused, as
/// rusqlite's conversion error for `column`.
fn unreadable<T>(column: usize, checked: Result<T, String>) -> rusqlite::Result<T> {
    checked.map_err(|why| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, why.into())
    })
}

/// A row's id as read raw (any type a hand-edited row may hold), for naming the row.
fn id_text(id: &rusqlite::types::Value) -> String {
    match id {
        rusqlite::types::Value::Text(text) => text.clone(),
        other => format!("{other:?}"),
    }
}

/// Column `column`, a size, count or number ([`crate::store::stored_unsigned`]).
fn unsigned<T: TryFrom<i64>>(row: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<T> {
    unreadable(
        column,
        crate::store::stored_unsigned(&format!("column {column}"), row.get::<_, i64>(column)?),
    )
}

crate::store::store_by_inherent_methods!(SqliteStore);
