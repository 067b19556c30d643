//! The daemon: listeners, background tasks, signals and systemd notifications.
//!
//! What flows through here: a config path in; out, a running actix-web server with every
//! dialect's routes on `server.listen` and `/metrics`, `/healthz`, `/readyz` on
//! `server.metrics_listen`, the async-delivery outbox, the session sweeper and the disk
//! watch. SIGHUP reloads config, plans, tenants and provider instances (a config that fails
//! validation is refused and the running one stays); SIGTERM/SIGINT stop accepting, let
//! in-flight uploads finish within `shutdown_timeout`, and exit 0. Each request is logged
//! once (method, route, status, bytes, duration, upload ids, tenant), never with keys.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{App, HttpMessage, HttpRequest, HttpResponse, HttpResponseBuilder, HttpServer, web};
use sd_notify::NotifyState;

use crate::config::{Config, ConfigError, LogFormat};
use crate::dialects::{self, DialectName};
use crate::error::{ApiError, DialectError};
use crate::forward;
use crate::gateway::{Gateway, RequestTenant};
use crate::intake::Spool;
use crate::metrics;
use crate::plugins::{self, PluginHostError};
use crate::policy::Policy;
use crate::sessions;
use crate::store::{Store, StoreError, UploadRecord};

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
}

fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items.iter().map(T::to_string).collect::<Vec<_>>().join("\n")
}

impl ServeError {
    /// 2 for bad config (plugins included), 1 for failures at run time.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Config(_) | Self::Plugins(_) => 2,
            Self::Store(_) | Self::Io { .. } | Self::Refused(_) => 1,
        }
    }

    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// Loads the config and instantiates its providers: everything `check-config` validates.
pub fn load(
    path: &Path,
) -> Result<(Config, std::collections::BTreeMap<String, Arc<plugins::Provider>>), ServeError> {
    let config = Config::load(path).map_err(ServeError::Config)?;
    let providers = plugins::instantiate(&config).map_err(ServeError::Plugins)?;
    Ok((config, providers))
}

/// What the request log learns from a handler.
#[derive(Debug, Clone, Default)]
struct UploadLog {
    ids: Vec<String>,
    /// Bytes of the files received (what the log reports when the request had no
    /// Content-Length, as with chunked transfer encoding).
    bytes: u64,
}

/// Attaches the ids and sizes of `records` to a response, for the request log.
pub fn with_upload_ids(mut builder: HttpResponseBuilder, records: &[UploadRecord]) -> HttpResponseBuilder {
    let log = UploadLog {
        ids: records.iter().map(|record| record.id.clone()).collect(),
        bytes: records.iter().map(|record| record.size).sum(),
    };
    builder.extensions_mut().insert(log);
    builder
}

fn init_logging(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn observe(
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let dialect = dialects::of_path(request.path());
    let method = request.method().clone();
    let declared_bytes = request
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let response = next.call(request).await?;
    let route = response
        .request()
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let status = response.status();
    let elapsed = started.elapsed();
    metrics::http_request(dialect, &route, status.as_u16(), elapsed);
    let error = response
        .response()
        .error()
        .and_then(|e| e.as_error::<DialectError>());
    if let Some(reason) = error.and_then(|error| {
        error
            .error
            .rejection_reason()
            .map(|reason| (error.dialect, reason))
    }) {
        metrics::rejection(reason.0, reason.1);
    }
    let log = response
        .response()
        .extensions()
        .get::<UploadLog>()
        .cloned()
        .unwrap_or_default();
    let tenant = response
        .request()
        .extensions()
        .get::<RequestTenant>()
        .map(|tenant| tenant.0.clone())
        .unwrap_or_default();
    let bytes = declared_bytes.unwrap_or(log.bytes);
    tracing::info!(
        method = %method,
        route = %route,
        dialect = dialect.map_or("none", |d| d.as_str()),
        status = status.as_u16(),
        bytes,
        duration_ms = elapsed.as_millis() as u64,
        upload_ids = %log.ids.join(","),
        tenant = %tenant,
        error = error.map(|e| e.error.to_string()).unwrap_or_default(),
        "request"
    );
    Ok(response)
}

/// No route matched: under a dialect's prefix, that dialect's 404; elsewhere a plain one.
async fn not_found(request: HttpRequest) -> Result<HttpResponse, DialectError> {
    match dialects::of_path(request.path()) {
        Some(dialect) => Err(DialectError::new(dialect, ApiError::NoSuchEndpoint)),
        None => Ok(HttpResponse::NotFound()
            .json(serde_json::json!({ "message": "no such endpoint", "status": 404 }))),
    }
}

async fn metrics_text() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(metrics::render())
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(gateway: web::Data<Gateway>) -> HttpResponse {
    let mut problems = Vec::new();
    if let Err(error) = gateway.store.outbox_len().await {
        problems.push(format!("store: {error}"));
    }
    if metrics::data_dir_below_floor() {
        problems.push("data_dir is below its free-space floor".to_owned());
    }
    let policy = gateway.policy();
    for provider in policy.providers.values() {
        let checked = provider.clone();
        let health = tokio::task::spawn_blocking(move || checked.health()).await;
        if !matches!(health, Ok(Ok(()))) {
            problems.push(format!("provider {} is not healthy", provider.name));
        }
    }
    if problems.is_empty() {
        HttpResponse::Ok().json(serde_json::json!({ "status": "ready" }))
    } else {
        HttpResponse::ServiceUnavailable()
            .json(serde_json::json!({ "status": "not ready", "problems": problems }))
    }
}

/// Counts open connections: one guard lives in each connection's extensions.
struct ConnectionGuard;

impl ConnectionGuard {
    fn new() -> Self {
        metrics::get().open_connections.inc();
        Self
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        metrics::get().open_connections.dec();
    }
}

fn notify(states: &[NotifyState<'_>]) {
    let _ = sd_notify::notify(states);
}

/// Runs the daemon until SIGTERM/SIGINT. Blocks the calling thread.
/// `upgate uploads delete`: deletes one upload of any tenant, as the Kore XO `DELETE` does
/// (the provider's copy, the spooled bytes, the record's state), from outside the daemon.
/// SQLite's WAL lets it share the store with a running daemon.
pub fn delete_upload(config_path: &Path, id: &str) -> Result<UploadRecord, ServeError> {
    if !DialectName::ALL
        .iter()
        .any(|dialect| dialect.is_valid_upload_id(id))
    {
        return Err(ServeError::Refused(
            "not an upload id (a uuid, 24 hex digits or f-<uuid>)".into(),
        ));
    }
    let (config, providers) = load(config_path)?;
    let server_config = config.server.clone();
    actix_web::rt::System::new().block_on(async move {
        let store = Store::open(&server_config.data_dir, server_config.durability)?;
        let spool = Spool::open(&server_config.data_dir, server_config.durability)
            .map_err(ServeError::io("cannot prepare the spool directory"))?;
        let gateway = Gateway::new(Policy::new(config, providers, None), store, spool);
        gateway.delete_as_operator(id).await.map_err(|error| match error {
            ApiError::NotFound => ServeError::Refused(format!("no upload {id} (or it was deleted already)")),
            other => ServeError::Refused(format!("cannot delete {id}: {other}")),
        })
    })
}

pub fn serve(config_path: &Path) -> Result<(), ServeError> {
    let (config, providers) = load(config_path)?;
    init_logging(config.server.log_format);
    let workers = config
        .server
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    actix_web::rt::System::new().block_on(run(config_path.to_path_buf(), config, providers, workers))
}

async fn run(
    config_path: PathBuf,
    config: Config,
    providers: std::collections::BTreeMap<String, Arc<plugins::Provider>>,
    workers: usize,
) -> Result<(), ServeError> {
    let server_config = config.server.clone();
    std::fs::create_dir_all(&server_config.data_dir).map_err(ServeError::io(format!(
        "cannot create data_dir {}",
        server_config.data_dir.display()
    )))?;
    let store = Store::open(&server_config.data_dir, server_config.durability)?;
    let spool = Spool::open(&server_config.data_dir, server_config.durability)
        .map_err(ServeError::io("cannot prepare the spool directory"))?;
    let orphans = spool
        .remove_orphans(&store.spooled_ids().await?)
        .map_err(ServeError::io("cannot sweep the spool"))?;
    if orphans > 0 {
        tracing::info!(
            orphans,
            "removed spooled files of uploads that were never acknowledged"
        );
    }
    store.release_outbox_leases().await?;
    metrics::watch_disk(&server_config.data_dir, server_config.disk_free_floor.0);
    metrics::prime(providers.keys().map(String::as_str));
    let gateway = web::Data::new(Gateway::new(Policy::new(config, providers, None), store, spool));

    let listener = TcpListener::bind(server_config.listen).map_err(ServeError::io(format!(
        "cannot listen on {}",
        server_config.listen
    )))?;
    let address = listener
        .local_addr()
        .map_err(ServeError::io("listener address"))?;
    let app_gateway = gateway.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(app_gateway.clone())
            .wrap(actix_web::middleware::from_fn(observe))
            .configure(dialects::configure)
            .default_service(web::to(not_found))
    })
    .workers(workers)
    .max_connections(server_config.max_connections)
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
                    .route("/metrics", web::get().to(metrics_text))
                    .route("/healthz", web::get().to(healthz))
                    .route("/readyz", web::get().to(readyz))
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

    actix_web::rt::spawn(forward::run_outbox(gateway.clone().into_inner()));
    actix_web::rt::spawn(sessions::run_housekeeping(
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
    let signals_gateway = gateway.clone();
    actix_web::rt::spawn(async move {
        wait_for_stop(&config_path, &signals_gateway).await;
        notify(&[
            NotifyState::Stopping,
            NotifyState::Status("draining in-flight uploads"),
        ]);
        tracing::info!("stopping: draining in-flight uploads");
        handle.stop(true).await;
        if let Some(metrics_handle) = metrics_handle {
            metrics_handle.stop(false).await;
        }
    });
    let metrics_task = metrics_server.map(actix_web::rt::spawn);
    server.await.map_err(ServeError::io("HTTP server"))?;
    if let Some(task) = metrics_task {
        let _ = task.await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Handles SIGHUP (reload) until SIGTERM or SIGINT arrives.
async fn wait_for_stop(config_path: &Path, gateway: &Gateway) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut terminate), Ok(mut interrupt), Ok(mut hangup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = terminate.recv() => return,
            _ = interrupt.recv() => return,
            _ = hangup.recv() => reload(config_path, gateway).await,
        }
    }
}

async fn reload(config_path: &Path, gateway: &Gateway) {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    notify(&states);
    let path = config_path.to_path_buf();
    let loaded = tokio::task::spawn_blocking(move || load(&path)).await;
    match loaded {
        Ok(Ok((config, providers))) => {
            let running = gateway.policy();
            if config.server.listen != running.config.server.listen
                || config.server.data_dir != running.config.server.data_dir
            {
                tracing::warn!("server.listen and server.data_dir changes take effect at the next restart");
            }
            metrics::prime(providers.keys().map(String::as_str));
            gateway.replace_policy(Policy::new(config, providers, Some(&running)));
            metrics::config_reload(true);
            tracing::info!("configuration reloaded");
        }
        Ok(Err(error)) => {
            metrics::config_reload(false);
            tracing::error!(%error, "configuration reload refused; the running configuration stays");
        }
        Err(_) => metrics::config_reload(false),
    }
    notify(&[NotifyState::Ready, NotifyState::Status("serving")]);
}
