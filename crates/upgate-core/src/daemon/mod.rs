//! The daemon: listeners, background tasks, signals and systemd notifications.
//!
//! What flows through here: a config path in; out, a running actix-web server with every
//! dialect's routes on `server.listen` and `/metrics`, `/healthz`, `/readyz` on
//! `server.metrics_listen`, the async-delivery outbox, the session sweeper and the disk
//! watch. SIGHUP reloads config, plans, tenants and provider instances (a config that fails
//! validation is refused and the running one stays); SIGTERM/SIGINT stop accepting and the
//! outbox's claims, let in-flight uploads and deliveries finish within `shutdown_timeout`,
//! and exit 0 without waiting for plugin calls still running. Each request is logged
//! once (method, route, status, bytes, duration, upload ids, tenant), never with keys.

mod logging;
mod operator;
mod signals;
mod workers;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer, web};
use sd_notify::NotifyState;

use crate::config::{Config, ConfigError};
use crate::http::{self, ConnectionGuard};
use crate::limits::Limiter;
use crate::limits::local::LocalLimiter;
use crate::limits::redis::RedisLimiter;
use crate::metrics;
use crate::plugins::{self, PluginHostError, Provider};
use crate::policy::Policy;
use crate::spool::Spool;
use crate::spool::local::LocalSpool;
use crate::spool::s3::S3Spool;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};
use crate::upload::Gateway;
pub use operator::{delete_upload, list_sessions, list_uploads, retry_upload, show_upload};

/// Why the daemon could not start or run. [`ServeError::exit_code`] maps it to the CLI's
/// exit codes.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{}", join(.0))]
    Config(Vec<ConfigError>),
    #[error("{}", join(.0))]
    Plugins(Vec<PluginHostError>),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    /// An operator command refused (no such upload, the provider could not delete, ...).
    #[error("{0}")]
    Refused(String),
    /// An operator command given an argument it cannot use (a malformed upload id): a
    /// usage error, like the ones the argument parser itself reports.
    #[error("{0}")]
    Usage(String),
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items.iter().map(T::to_string).collect::<Vec<_>>().join("\n")
}

impl ServeError {
    /// 2 for bad config (plugins included) and bad arguments, 1 for failures at run time.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) | Self::Plugins(_) | Self::Usage(_) => 2,
            Self::Store(_) | Self::Io { .. } | Self::Refused(_) => 1,
        }
    }

    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// The provider instances of a config, by name.
pub(crate) type Providers = BTreeMap<String, Arc<Provider>>;

/// Loads the config and instantiates its providers.
pub fn load(path: &Path) -> Result<(Config, Providers), ServeError> {
    let config = Config::load(path).map_err(ServeError::Config)?;
    let providers = plugins::instantiate(&config).map_err(ServeError::Plugins)?;
    Ok((config, providers))
}

/// Everything `check-config` validates: [`load`], that a shared store (`server.store`)
/// answers and has a schema this upgate can use (an error located at `server.store.url`,
/// its password never shown), and that the shared limits' Redis (`server.limits`) answers
/// `PING` (an error located at `server.limits.url`). Returns a line about each engine for the
/// report. Without `engines_too` (`check-config --offline`, systemd's reload check), only
/// [`load`]: a reload must go through while an engine is down (to revoke a key, say).
pub fn check(path: &Path, engines_too: bool) -> Result<(Config, Providers, Vec<String>), ServeError> {
    let (config, providers) = load(path)?;
    let mut engines = Vec::new();
    if !engines_too {
        return Ok((config, providers, engines));
    }
    let mut errors = Vec::new();
    let runtime = actix_web::rt::System::new();
    if let Some(store) = &config.server.store {
        match runtime.block_on(PostgresStore::probe(&store.url)) {
            Ok(0) => engines.push(format!("store {}: reachable, not yet migrated", store.url)),
            Ok(version) => engines.push(format!(
                "store {}: reachable, schema version {version}",
                store.url
            )),
            Err(error) => errors.push(config.error_at(
                &["server", "store", "url"],
                format!("cannot use the PostgreSQL store at {}: {error}", store.url),
            )),
        }
    }
    if let Some(shared) = &config.server.spool {
        // Opening the shared spool makes its local directory in data_dir.
        check_data_dir_owner(&config.server.data_dir)?;
        let checked = S3Spool::open(&config.server.data_dir, config.server.durability, shared)
            .map_err(|error| error.to_string())
            .and_then(|spool| spool.check().map_err(|error| error.to_string()));
        match checked {
            Ok(()) => engines.push(format!(
                "spool {} at {}: reachable",
                shared.url,
                shared.endpoint()
            )),
            Err(error) => errors.push(config.error_at(
                &["server", "spool", "url"],
                format!(
                    "cannot use the shared spool {} at {}: {error}",
                    shared.url,
                    shared.endpoint()
                ),
            )),
        }
    }
    if let Some(limits) = &config.server.limits {
        match runtime.block_on(RedisLimiter::probe(limits)) {
            Ok(()) => engines.push(format!("limits {}: reachable", limits.url)),
            Err(error) => {
                let meanwhile = if limits.fault_tolerant {
                    "the daemon would count limits on each node's own until it answers (fault_tolerant)"
                } else {
                    "the daemon would answer 503 until it answers (fault_tolerant: false)"
                };
                errors.push(config.error_at(
                    &["server", "limits", "url"],
                    format!(
                        "cannot reach the Redis of the shared limits at {}: {error}; {meanwhile}",
                        limits.url
                    ),
                ));
            }
        }
    }
    if !errors.is_empty() {
        return Err(ServeError::Config(errors));
    }
    Ok((config, providers, engines))
}

/// Refuses to work as root in a `data_dir` whose daemon runs as another user (its store or
/// spool belongs to that user, the packaged unit's `upgate`): the files root would create
/// there (SQLite's `-wal` and `-shm` while the daemon is stopped, spool files) would be
/// root's, and the daemon could not open them at its next start. A `data_dir` whose files are
/// root's (a daemon run as root, in a container say), or that holds none yet, is not refused.
fn check_data_dir_owner(data_dir: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::MetadataExt;

    if !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let daemons_own = ["upgate.db", "spool"]
        .iter()
        .find_map(|name| std::fs::metadata(data_dir.join(name)).ok());
    match daemons_own {
        Some(metadata) if metadata.uid() != 0 => Err(ServeError::Refused(format!(
            "data_dir {} holds the files of a daemon run as user id {}, and this runs as root: \
             files it created there would be root's and that daemon could not use them; run it \
             as that user (with the packaged unit: sudo -u upgate upgate ...)",
            data_dir.display(),
            metadata.uid()
        ))),
        _ => Ok(()),
    }
}

/// The configured store: PostgreSQL at `server.store.url` (migrated, waiting while another
/// node migrates), or SQLite in `data_dir`; never as root in another user's `data_dir`.
async fn open_store(config: &Config) -> Result<Arc<dyn Store>, ServeError> {
    check_data_dir_owner(&config.server.data_dir)?;
    let server = &config.server;
    Ok(match &server.store {
        Some(store) => Arc::new(PostgresStore::open(&store.url).await?),
        None => Arc::new(SqliteStore::open(&server.data_dir, server.durability)?),
    })
}

/// The configured spool: S3-compatible object storage at `server.spool.url` (with this
/// node's `data_dir/spool` for what arrives), or `data_dir/spool` alone.
fn open_spool(config: &Config) -> Result<Arc<dyn Spool>, ServeError> {
    let server = &config.server;
    Ok(match &server.spool {
        Some(shared) => Arc::new(
            S3Spool::open(&server.data_dir, server.durability, shared).map_err(ServeError::io(format!(
                "cannot set up the shared spool {}",
                shared.url
            )))?,
        ),
        None => Arc::new(
            LocalSpool::open(&server.data_dir, server.durability)
                .map_err(ServeError::io("cannot prepare the spool directory"))?,
        ),
    })
}

fn notify(states: &[NotifyState<'_>]) {
    let _ = sd_notify::notify(states);
}

/// The gateway over the configured store, spool and limits (the embedded defaults: SQLite
/// and the spool in `data_dir`, limits in this process; with `server.store`, PostgreSQL,
/// which the limiter's quotas then share with every node; with `server.limits`, rates and
/// tenant concurrency in Redis).
async fn open_gateway(
    config: Config,
    providers: BTreeMap<String, Arc<Provider>>,
) -> Result<Gateway, ServeError> {
    let store = open_store(&config).await?;
    let spool = open_spool(&config)?;
    let server = &config.server;
    let limiter: Arc<dyn Limiter> = match &server.limits {
        Some(limits) => {
            Arc::new(
                RedisLimiter::new(limits, store.clone()).map_err(|error| ServeError::Io {
                    what: format!("cannot set up the shared limits at {}", limits.url),
                    source: std::io::Error::other(error.to_string()),
                })?,
            )
        }
        None => Arc::new(LocalLimiter::new(store.clone())),
    };
    Ok(Gateway::new(
        Policy::new(config, providers),
        store,
        spool,
        limiter,
    ))
}

/// Runs the daemon until SIGTERM/SIGINT. Blocks the calling thread.
pub fn serve(config_path: &Path) -> Result<(), ServeError> {
    let system = actix_web::rt::System::new();
    let served = system.block_on(async {
        // Caught before the config and the plugins load (which takes a while): a SIGHUP
        // meanwhile is a reload once the daemon serves, not the end of the process.
        let hangup = signals::Hangup::catch();
        let (config, providers) = load(config_path)?;
        logging::init(config.server.log_format);
        let workers = config
            .server
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
        run(config_path.to_path_buf(), config, providers, workers, hangup).await
    });
    // Not dropped: dropping the runtime would wait, with no bound, for every blocking thread
    // (a plugin call that hangs upstream). Everything that must finish did, within
    // `shutdown_timeout`; what is left ends with the process.
    std::mem::forget(system);
    served
}

async fn run(
    config_path: PathBuf,
    config: Config,
    providers: BTreeMap<String, Arc<Provider>>,
    workers: usize,
    hangup: signals::Hangup,
) -> Result<(), ServeError> {
    let server_config = config.server.clone();
    std::fs::create_dir_all(&server_config.data_dir).map_err(ServeError::io(format!(
        "cannot create data_dir {}",
        server_config.data_dir.display()
    )))?;
    metrics::prime(providers.keys().map(String::as_str));
    if config.server.store.is_some() && config.server.spool.is_none() {
        tracing::warn!(
            "server.store is shared but the spool is this node's disk: with several nodes, another node's \
             outbox may claim an async upload whose bytes are here, and sessions started here continue only \
             here (set server.spool; see README, Running several nodes)"
        );
    }
    let gateway = open_gateway(config, providers).await?;
    // What a crash left: parts of uploads that never finished, spooled files of uploads never
    // acknowledged, leases of deliveries that died with the process.
    let spool = gateway.spool.clone();
    let keep = gateway.store.spooled_ids().await?;
    let store = gateway.store.identity().await?;
    // Housekeeping: a shared spool that is unreachable now must not keep the node from
    // starting (it answers 503 until the spool is back); the sweep runs at the next start.
    // One that answers to another store's records is a configuration error: its objects
    // would all look like orphans here.
    let swept = tokio::task::spawn_blocking(move || match spool.bind_to_store(&store) {
        Ok(()) => Ok(spool.remove_orphans(&keep)),
        Err(error) => Err(error),
    })
    .await;
    match swept {
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::InvalidData => {
            return Err(ServeError::Io {
                what: "the shared spool belongs to another store".into(),
                source: error,
            });
        }
        Ok(Ok(Ok(0))) => {}
        Ok(Ok(Ok(orphans))) => tracing::info!(
            orphans,
            "removed spooled files of uploads that were never acknowledged"
        ),
        Ok(Ok(Err(error)) | Err(error)) => {
            tracing::warn!(%error, "cannot sweep the spool's orphans now; left for the next start")
        }
        Err(error) => tracing::warn!(%error, "the spool's orphan sweep stopped"),
    }
    gateway.store.release_outbox_leases().await?;
    gateway.fail_interrupted_deliveries().await;
    if let Some(below) = metrics::watch_disk(&server_config.data_dir, server_config.disk_free_floor.0) {
        gateway.set_below_disk_floor(below);
    }
    let gateway = web::Data::new(gateway);

    let listener = TcpListener::bind(server_config.listen).map_err(ServeError::io(format!(
        "cannot listen on {}",
        server_config.listen
    )))?;
    let address = listener
        .local_addr()
        .map_err(ServeError::io("listener address"))?;
    let app_gateway = gateway.clone();
    actix_http::h1::set_rejection_body(http::rejection_body);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(app_gateway.clone())
            .wrap(actix_web::middleware::from_fn(http::body_rate::enforce))
            .wrap(actix_web::middleware::from_fn(http::cors::cors))
            .wrap(actix_web::middleware::from_fn(http::request_log::observe))
            .configure(http::routes)
    })
    .workers(workers)
    // actix counts connections per worker: `max_connections` is the daemon's, shared out.
    .max_connections(server_config.max_connections.div_ceil(workers.max(1)))
    .client_request_timeout(server_config.header_timeout.0)
    .client_disconnect_timeout(Duration::from_secs(5))
    .keep_alive(Duration::from_secs(75))
    .shutdown_timeout(server_config.shutdown_timeout.0.as_secs().max(1))
    .disable_signals()
    .on_connect(|_, extensions| {
        extensions.insert(ConnectionGuard::new());
    })
    .listen(listener)
    .map_err(ServeError::io("cannot start the HTTP server"))?
    .run();
    let handle = server.handle();

    let metrics_server = match server_config.metrics_listen {
        Some(metrics_listen) => {
            let listener = TcpListener::bind(metrics_listen).map_err(ServeError::io(format!(
                "cannot listen on {metrics_listen} (metrics_listen)"
            )))?;
            let metrics_address = listener
                .local_addr()
                .map_err(ServeError::io("listener address"))?;
            let metrics_gateway = gateway.clone();
            let server = HttpServer::new(move || {
                App::new()
                    .app_data(metrics_gateway.clone())
                    .configure(http::probes)
            })
            .workers(1)
            .disable_signals()
            .listen(listener)
            .map_err(ServeError::io("cannot start the metrics server"))?
            .run();
            println!("upgate: metrics on http://{metrics_address}");
            Some(server)
        }
        None => None,
    };
    println!("upgate: listening on http://{address}");
    tracing::info!(%address, version = env!("CARGO_PKG_VERSION"), "upgate started");

    let outbox = actix_web::rt::spawn(workers::run_outbox(
        gateway.clone().into_inner(),
        server_config.shutdown_timeout.0,
    ));
    actix_web::rt::spawn(workers::run_housekeeping(
        gateway.clone().into_inner(),
        server_config.clone(),
    ));
    if let Some(interval) = sd_notify::watchdog_enabled() {
        actix_web::rt::spawn(async move {
            loop {
                notify(&[NotifyState::Watchdog]);
                tokio::time::sleep(interval / 2).await;
            }
        });
    }
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);

    let metrics_handle = metrics_server.as_ref().map(|server| server.handle());
    // What the server waits for in-flight requests (whole seconds, at least one).
    let drain_limit = std::time::Duration::from_secs(server_config.shutdown_timeout.0.as_secs().max(1));
    let signals_gateway = gateway.clone();
    actix_web::rt::spawn(async move {
        let mut stops = signals::wait_for_stop(&config_path, &signals_gateway, hangup).await;
        notify(&[
            NotifyState::Stopping,
            NotifyState::Status("draining in-flight uploads"),
        ]);
        tracing::info!("stopping: draining in-flight uploads");
        signals_gateway.stop();
        let mut drained = std::pin::pin!(handle.stop(true));
        // Just before the server cuts what still runs at `shutdown_timeout`, what that is.
        let mut last_look = std::pin::pin!(tokio::time::sleep(
            drain_limit.saturating_sub(std::time::Duration::from_millis(200))
        ));
        let mut looked = false;
        loop {
            tokio::select! {
                _ = &mut drained => break,
                _ = &mut last_look, if !looked => {
                    looked = true;
                    let open = metrics::get().open_connections.get();
                    if open > 0 {
                        tracing::warn!(connections = open,
                            "shutdown_timeout is passing: the requests still running are cut, their uploads not accepted");
                    }
                }
                _ = stops.next() => {
                    // The server takes no second stop while it drains: the process ends here,
                    // as after `shutdown_timeout` (the store is crash-safe; the next start
                    // sweeps the spool and fails the interrupted deliveries' records).
                    tracing::warn!("a second stop signal: exiting now, the uploads still open are cut");
                    std::process::exit(1);
                }
            }
        }
        if let Some(metrics_handle) = metrics_handle {
            metrics_handle.stop(false).await;
        }
    });
    let metrics_task = metrics_server.map(actix_web::rt::spawn);
    server.await.map_err(ServeError::io("HTTP server"))?;
    gateway.stop();
    let _ = outbox.await;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    tracing::info!("stopped");
    Ok(())
}
