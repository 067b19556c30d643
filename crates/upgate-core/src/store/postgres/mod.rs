//! The PostgreSQL store behind [`crate::store::Store`]: the database several upgate nodes
//! share (`server.store.url`), one table per file beside this one, with the same semantics
//! as `sqlite/`.
//!
//! What flows through here: each store call takes a connection from a small pool of its own
//! (at most [`POOL_SIZE`], opened when needed, dropped when the server closes them, so a
//! node reconnects by itself when PostgreSQL comes back), runs its statements (prepared once
//! per connection) and answers after commit. The connections' I/O runs on a dedicated
//! thread with its own Tokio runtime, so no HTTP worker's runtime owns a socket another one
//! uses. Every call is bounded: [`CONNECT_TIMEOUT`] to connect, [`STATEMENT_TIMEOUT`] per
//! statement on the server, [`CALL_TIMEOUT`] for the whole call here; a database that is
//! down, restarting or overloaded is [`StoreError::Unavailable`] (the client gets 503 and
//! `Retry-After`). TLS when the URL asks for it ([`tls`]), plaintext otherwise. Schema
//! changes are versioned migrations ([`migrations`]), applied by one node under an advisory
//! lock while the others wait.

mod migrations;
mod outbox;
mod sessions;
#[cfg(test)]
mod tests;
mod tls;
mod uploads;
mod usage;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_postgres::{Client, NoTls, Row, Statement};

use super::StoreError;
use crate::config::PostgresUrl;

/// Most connections one node holds.
const POOL_SIZE: usize = 16;
/// Longest wait for a new connection (TCP and startup) before the call fails.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest one statement may run on the server (`statement_timeout`).
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a whole store call may take here (a free connection, connecting, its statements):
/// past it the call is [`StoreError::Unavailable`], whatever the network does.
const CALL_TIMEOUT: Duration = Duration::from_secs(6);

/// Handle to the pool. Cheap to clone.
#[derive(Clone)]
pub(crate) struct PostgresStore {
    pool: Arc<Pool>,
    /// This node's clock (Unix epoch milliseconds): what the times it passes in are read
    /// from, measured against PostgreSQL's in every statement that compares them
    /// ([`on_db_clock`]). A test gives a node a clock that runs ahead.
    node_clock: fn() -> i64,
}

struct Pool {
    target: Target,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    /// The runtime the connections' I/O runs on.
    driver: tokio::runtime::Handle,
    /// Dropped with the pool: the driver thread ends and closes the connections.
    _stop: oneshot::Sender<()>,
}

/// One open connection and the statements prepared on it.
pub(super) struct Connection {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Connection {
    /// `sql`, prepared on this connection once.
    pub(super) async fn prepare(&mut self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }

    pub(super) fn client(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// A connection taken from the pool, given back when dropped if it is still good.
struct Lease {
    pool: Arc<Pool>,
    connection: Option<Connection>,
    reusable: bool,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take()
            && self.reusable
            && !connection.client.is_closed()
        {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(connection);
        }
    }
}

impl Pool {
    async fn lease(self: &Arc<Self>) -> Result<Lease, StoreError> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Closed)?;
        let reused = loop {
            let next = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match next {
                Some(connection) if connection.client.is_closed() => continue,
                other => break other,
            }
        };
        let connection = match reused {
            Some(connection) => connection,
            None => Connection {
                client: self.connect().await?,
                statements: HashMap::new(),
            },
        };
        Ok(Lease {
            pool: self.clone(),
            connection: Some(connection),
            reusable: false,
            _permit: permit,
        })
    }

    /// A new connection, its I/O on the driver runtime.
    async fn connect(&self) -> Result<Client, StoreError> {
        connect_on(&self.driver, self.target.clone()).await
    }
}

/// Where and how to connect: the driver's settings and, when the URL asks for it, TLS.
#[derive(Clone)]
struct Target {
    config: tokio_postgres::Config,
    tls: Option<tls::MakeRustls>,
}

/// The connection's I/O, logged when it ends in an error.
async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(error) = connection.await {
        tracing::warn!(error = %describe(&error), "PostgreSQL connection lost");
    }
}

async fn connect_on(driver: &tokio::runtime::Handle, target: Target) -> Result<Client, StoreError> {
    let connecting = driver.spawn(async move {
        let client = match target.tls {
            Some(tls) => {
                let (client, connection) = target.config.connect(tls).await?;
                tokio::spawn(drive(connection));
                client
            }
            None => {
                let (client, connection) = target.config.connect(NoTls).await?;
                tokio::spawn(drive(connection));
                client
            }
        };
        Ok::<_, tokio_postgres::Error>(client)
    });
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(connected)) => Ok(connected?),
        Ok(Err(_)) => Err(StoreError::Closed),
        Err(_) => Err(StoreError::Unavailable(format!(
            "no connection within {} s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// The driver's settings for `url`: upgate's timeouts unless the URL sets its own
/// `connect_timeout`, the statement timeout added to the URL's `options`; and its TLS.
fn target_of(url: &PostgresUrl) -> Result<Target, StoreError> {
    let open_error = |message: String| StoreError::Open {
        path: url.to_string(),
        message,
    };
    let mut config: tokio_postgres::Config = url
        .expose()
        .parse()
        .map_err(|error| open_error(describe(&error)))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let statement_timeout = format!("-c statement_timeout={}", STATEMENT_TIMEOUT.as_millis());
    let options = match config.get_options() {
        Some(options) if !options.is_empty() => format!("{options} {statement_timeout}"),
        _ => statement_timeout,
    };
    config.options(options);
    if config.get_application_name().is_none() {
        config.application_name("upgate");
    }
    let tls = match url.tls() {
        Some(tls) => {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            Some(tls::MakeRustls::new(tls).map_err(open_error)?)
        }
        None => {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
            None
        }
    };
    Ok(Target { config, tls })
}

impl PostgresStore {
    /// Several nodes share one database.
    pub(super) const SHARED: bool = true;

    /// Connects to the database at `url` and brings its schema up to date (waiting while
    /// another node does), then serves calls from the pool.
    pub(crate) async fn open(url: &PostgresUrl) -> Result<Self, StoreError> {
        let open_error = |message: String| StoreError::Open {
            path: url.to_string(),
            message,
        };
        let target = target_of(url)?;
        let (driver, stop) =
            crate::driver::start("upgate-postgres").map_err(|e| open_error(e.to_string()))?;
        let mut client = connect_on(&driver, target.clone())
            .await
            .map_err(|e| open_error(e.to_string()))?;
        migrations::migrate(&mut client)
            .await
            .map_err(|e| open_error(e.to_string()))?;
        let first = Connection {
            client,
            statements: HashMap::new(),
        };
        Ok(Self {
            pool: Arc::new(Pool {
                target,
                idle: Mutex::new(vec![first]),
                permits: Arc::new(Semaphore::new(POOL_SIZE)),
                driver,
                _stop: stop,
            }),
            node_clock: crate::vocab::now_ms,
        })
    }

    /// The schema version this upgate migrates the database to.
    pub(crate) const SCHEMA_VERSION: usize = migrations::MIGRATIONS.len();

    /// What `check-config` asks: the database at `url` answers, and its schema is one this
    /// upgate can use. Returns the schema version (0 for a database upgate never used).
    pub(crate) async fn probe(url: &PostgresUrl) -> Result<usize, StoreError> {
        let target = target_of(url)?;
        let (driver, _stop) =
            crate::driver::start("upgate-postgres").map_err(|e| StoreError::Database(e.to_string()))?;
        let client = connect_on(&driver, target).await?;
        let checked = tokio::time::timeout(CALL_TIMEOUT, migrations::check_version(&client)).await;
        checked.unwrap_or_else(|_| Err(StoreError::Unavailable("no answer in time".into())))
    }

    async fn identity(&self) -> Result<String, StoreError> {
        self.call(|connection| {
            Box::pin(async move {
                let select = connection.prepare("SELECT id FROM store_identity").await?;
                let row = connection.client().query_one(&select, &[]).await?;
                Ok(row.try_get::<_, String>(0)?)
            })
        })
        .await
    }

    /// Runs `work` on a pooled connection, within [`CALL_TIMEOUT`]. A connection that failed
    /// or was cut off mid-call is not given back.
    pub(super) async fn call<T, W>(&self, work: W) -> Result<T, StoreError>
    where
        T: Send,
        W: for<'c> FnOnce(&'c mut Connection) -> BoxFuture<'c, Result<T, StoreError>> + Send,
    {
        let pool = self.pool.clone();
        let run = async move {
            let mut lease = pool.lease().await?;
            let result = match lease.connection.as_mut() {
                Some(connection) => work(connection).await,
                None => Err(StoreError::Closed),
            };
            lease.reusable = !matches!(result, Err(StoreError::Unavailable(_)));
            result
        };
        tokio::time::timeout(CALL_TIMEOUT, run).await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(format!(
                "no answer within {} s",
                CALL_TIMEOUT.as_secs()
            )))
        })
    }
}

/// An error with its cause (the driver's own text is only its kind: "db error").
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(error) {
            Some(cause) => format!("{error}: {cause}"),
            None => error.to_string(),
        },
    }
}

/// SQLSTATE `disk_full`: [`StoreError::Full`], as SQLite's full disk is.
const DISK_FULL: &str = "53100";

/// SQLSTATE classes and codes that say the database is down, restarting, out of resources
/// or too slow, rather than that a statement is wrong.
fn is_unavailable_code(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || (code.starts_with("53") && code != DISK_FULL) // insufficient resources (too many connections)
        || code.starts_with("57P") // admin or crash shutdown, cannot connect now
        || code == "57014" // query canceled: statement_timeout
        || code == "40001" // serialization failure
        || code == "40P01" // deadlock detected
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> Self {
        if error
            .as_db_error()
            .is_some_and(|db| db.code().code() == DISK_FULL)
        {
            return Self::Full;
        }
        let unavailable = match error.as_db_error() {
            Some(db) => is_unavailable_code(db.code().code()),
            None => {
                error.is_closed()
                    || std::error::Error::source(&error).is_some_and(|cause| cause.is::<std::io::Error>())
                    || error.to_string() == "timeout waiting for server"
            }
        };
        let message = describe(&error);
        if unavailable {
            Self::Unavailable(message)
        } else {
            Self::Database(message)
        }
    }
}

/// A text column that must hold one of a known set of names (a dialect, a state): a value
/// no version of upgate writes is an error, never a silent default.
fn parse_column<T>(row: &Row, column: usize, parse: impl Fn(&str) -> Option<T>) -> Result<T, StoreError> {
    let text: &str = row.try_get(column)?;
    parse(text).ok_or_else(|| {
        StoreError::Database(format!(
            "column {column}: unknown value `{}`",
            text.chars().take(32).collect::<String>()
        ))
    })
}

/// Column `column`, a size, count or number ([`crate::store::stored_unsigned`]).
fn unsigned<T: TryFrom<i64>>(row: &Row, column: usize) -> Result<T, StoreError> {
    crate::store::stored_unsigned(&format!("column {column}"), row.try_get::<_, i64>(column)?)
        .map_err(StoreError::Database)
}

/// PostgreSQL's clock as SQL (Unix epoch milliseconds, fixed for the statement).
macro_rules! db_now {
    () => {
        "(EXTRACT(EPOCH FROM statement_timestamp()) * 1000)::bigint"
    };
}
pub(super) use db_now;

/// SQL for `$time`, a time on this node's clock (Unix epoch milliseconds), moved onto
/// PostgreSQL's: shifted by how far PostgreSQL's clock stands from this node's (`$node_now`,
/// the node's clock read when the statement is sent). Every time that leases and due times
/// are compared in goes through it (or is [`db_now`]), so nodes whose clocks disagree still
/// agree on when a lease ends: a node whose clock runs a minute ahead takes over no lease a
/// minute early.
macro_rules! on_db_clock {
    ($time:literal, $node_now:literal) => {
        concat!(
            "(",
            $time,
            "::bigint + ",
            $crate::store::postgres::db_now!(),
            " - ",
            $node_now,
            "::bigint)"
        )
    };
}
pub(super) use on_db_clock;

/// A count or size as PostgreSQL's `bigint`.
fn big(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

crate::store::store_by_inherent_methods!(PostgresStore);
