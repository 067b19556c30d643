//! Configuration: the YAML file in, a validated [`Config`] out.
//!
//! What flows through here: the text of `config.yaml` (parsed with `serde_norway`, the
//! maintained fork of the deprecated `serde_yaml`), `${VAR}` references resolved from the
//! environment, sizes (`10MiB`) and durations (`30s`) parsed, relative paths resolved against
//! the config file's directory, and cross-references (plans, providers, dialects) checked.
//! Every error names the file, line and column and what was expected.

pub(crate) mod keys;
mod limits;
mod location;
mod spool;
mod store;
#[cfg(test)]
mod tests;
pub(crate) mod units;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};

use crate::vocab::DialectName;
pub(crate) use keys::{ApiKey, KeyDigest};
pub(crate) use limits::LimitsConfig;
#[cfg(test)]
pub(crate) use limits::RedisUrl;
use location::locate;
pub(crate) use spool::SpoolConfig;
pub(crate) use store::{PostgresTls, PostgresUrl, StoreConfig};
pub(crate) use units::{ByteSize, HumanDuration, PluginSettings, env_path};

/// A config problem, located in the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read { file: String, source: std::io::Error },
    #[error("{file}:{line}:{column}: {message}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        message: String,
    },
}

impl ConfigError {
    fn at(file: &Path, line: usize, column: usize, message: impl Into<String>) -> Self {
        Self::Invalid {
            file: file.display().to_string(),
            line,
            column,
            message: message.into(),
        }
    }
}

/// `path` as the operator meant it: relative to `base`, the config file's directory (`./x`
/// under `.` is `./x`, not `././x`).
pub(crate) fn resolve_relative(base: &Path, path: &mut PathBuf) {
    if path.is_relative() {
        *path = base.join(path.strip_prefix(".").unwrap_or(path));
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_metrics_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("./data")
}
fn default_plugin_dir() -> PathBuf {
    PathBuf::from("./target/release")
}
fn default_intake_memory() -> ByteSize {
    ByteSize(32 << 20)
}

fn default_max_connections() -> usize {
    10_000
}
fn secs(seconds: u64) -> HumanDuration {
    HumanDuration(Duration::from_secs(seconds))
}
fn default_header_timeout() -> HumanDuration {
    secs(10)
}
fn default_idle_timeout() -> HumanDuration {
    secs(30)
}
fn default_shutdown_timeout() -> HumanDuration {
    secs(30)
}
fn default_session_expiry() -> HumanDuration {
    secs(24 * 3600)
}
fn default_sweep_interval() -> HumanDuration {
    secs(60)
}
fn default_disk_free_floor() -> ByteSize {
    ByteSize(512 << 20)
}
/// Kestrel's `MinRequestBodyDataRate` default: 240 bytes/s after a 5 s grace; upgate gives
/// slow links 10 s.
fn default_min_body_rate() -> ByteSize {
    ByteSize(240)
}
fn default_min_body_rate_grace() -> HumanDuration {
    secs(10)
}

fn default_forward_concurrency() -> usize {
    64
}
fn default_true() -> bool {
    true
}

/// How much an acknowledged upload survives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Survives a crash of the daemon (data in the page cache, SQLite WAL with
    /// `synchronous=NORMAL`); the last moments may be lost on power loss.
    #[default]
    ProcessCrash,
    /// Survives power loss: the spool file and its directory are fsynced and SQLite commits
    /// with `synchronous=FULL` before the client is answered.
    PowerLoss,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `server:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// `/metrics`, `/healthz`, `/readyz`; `null` turns the listener off.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default = "default_data_dir", deserialize_with = "env_path")]
    pub data_dir: PathBuf,
    #[serde(default = "default_plugin_dir", deserialize_with = "env_path")]
    pub plugin_dir: PathBuf,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// HTTP worker threads (default: one per core).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Longest a client may take to send the request head.
    #[serde(default = "default_header_timeout")]
    pub header_timeout: HumanDuration,
    /// Longest pause between two pieces of a request body before the client is dropped.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// How long SIGTERM waits for in-flight uploads.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: HumanDuration,
    #[serde(default)]
    pub durability: Durability,
    /// Default lifetime of a chunked upload session.
    #[serde(default = "default_session_expiry")]
    pub session_expiry: HumanDuration,
    /// How often expired sessions are swept.
    #[serde(default = "default_sweep_interval")]
    pub sweep_interval: HumanDuration,
    /// `/readyz` fails and uploads are refused below this much free space in `data_dir`.
    #[serde(default = "default_disk_free_floor")]
    pub disk_free_floor: ByteSize,
    /// The memory the spool writers of all uploads in progress share for large write slices
    /// (see README, "Memory"): past it, uploads write in 64 KiB slices.
    #[serde(default = "default_intake_memory")]
    pub intake_memory: ByteSize,
    /// Global cap on uploads in progress (0 = none).
    #[serde(default)]
    pub max_concurrent_uploads: usize,
    /// Plugin calls running at once (they run on blocking threads).
    #[serde(default = "default_forward_concurrency")]
    pub forward_concurrency: usize,
    #[serde(default)]
    pub log_format: LogFormat,
    /// The slowest average a request body may arrive at, per second, once
    /// `min_body_rate_grace` has passed (0: no minimum).
    #[serde(default = "default_min_body_rate")]
    pub min_body_rate: ByteSize,
    #[serde(default = "default_min_body_rate_grace")]
    pub min_body_rate_grace: HumanDuration,
    /// Browsers of these origins may call every dialect (absent: no CORS headers at all).
    #[serde(default)]
    pub cors: Option<CorsConfig>,
    /// A shared store (PostgreSQL) for cluster mode; absent: SQLite in `data_dir`.
    #[serde(default)]
    pub store: Option<StoreConfig>,
    /// Shared object storage (S3) for the bytes that must outlive a node: acknowledged async
    /// uploads, session chunks, tus uploads; absent: `data_dir/spool` on local disk.
    #[serde(default)]
    pub spool: Option<SpoolConfig>,
    /// Rate limits and tenant concurrency shared by several nodes (Redis); absent: counted
    /// in this process.
    #[serde(default)]
    pub limits: Option<LimitsConfig>,
}

impl ServerConfig {
    /// These settings with the ones a reload applies at once taken from `new`
    /// (`idle_timeout`, `session_expiry`, `max_concurrent_uploads`, `min_body_rate`,
    /// `min_body_rate_grace`, `cors`); every other one stays as it is until a restart.
    pub(crate) fn with_live_settings_of(&self, new: ServerConfig) -> ServerConfig {
        ServerConfig {
            idle_timeout: new.idle_timeout,
            session_expiry: new.session_expiry,
            max_concurrent_uploads: new.max_concurrent_uploads,
            min_body_rate: new.min_body_rate,
            min_body_rate_grace: new.min_body_rate_grace,
            cors: new.cors,
            ..self.clone()
        }
    }
}

/// `server.cors:`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Exact origins (`https://app.example.com`, `http://localhost:3000`), or `"*"`.
    pub allowed_origins: Vec<String>,
}

impl CorsConfig {
    /// Whether a request's `Origin` may read the answers.
    pub(crate) fn allows(&self, origin: &str) -> bool {
        self.allowed_origins
            .iter()
            .any(|allowed| allowed == "*" || allowed == origin)
    }
}

/// An origin as a browser sends it: `scheme://host[:port]`, nothing after.
fn valid_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    matches!(scheme, "http" | "https")
        && !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

/// Bounds of `rate_limit.requests_per_second`: one request a day up to one a microsecond,
/// so the replenish period is always a whole, representable number of nanoseconds.
pub(crate) const MIN_REQUESTS_PER_SECOND: f64 = 1.0 / 86_400.0;
pub(crate) const MAX_REQUESTS_PER_SECOND: f64 = 1_000_000.0;

/// `rate_limit:` inside a plan.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub requests_per_second: f64,
    pub burst: u32,
}

/// One entry of `plans:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    pub max_file_size: ByteSize,
    /// Lower-case extensions without the dot; `""` allows names without one. Absent: any.
    #[serde(default)]
    pub allowed_extensions: Option<Vec<String>>,
    #[serde(default = "default_true")]
    pub verify_content: bool,
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    #[serde(default)]
    pub max_concurrent_uploads: Option<usize>,
    #[serde(default)]
    pub max_files_per_request: Option<usize>,
    #[serde(default)]
    pub daily_bytes: Option<ByteSize>,
    #[serde(default)]
    pub daily_uploads: Option<u64>,
    /// Unfinished Kore sessions and tus uploads a tenant may hold at once (their bytes count
    /// towards no quota until they complete). Absent: [`DEFAULT_MAX_OPEN_SESSIONS`].
    #[serde(default)]
    pub max_open_sessions: Option<u64>,
}

/// A plan's `max_open_sessions` when it names none.
pub(crate) const DEFAULT_MAX_OPEN_SESSIONS: u64 = 100;

/// When the client is answered relative to forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    #[default]
    Sync,
    Async,
}

fn default_initial_backoff() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}
fn default_max_backoff() -> HumanDuration {
    secs(300)
}
fn default_forward_timeout() -> HumanDuration {
    secs(300)
}

/// `retry:` inside a provider.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all; unset, see [`ProviderConfig::max_attempts`].
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff: HumanDuration,
    #[serde(default = "default_max_backoff")]
    pub max_backoff: HumanDuration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: None,
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

/// One entry of `providers:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Plugin name: `local` loads `libupgate_plugin_local.so` from `server.plugin_dir`.
    pub plugin: String,
    #[serde(default)]
    pub settings: PluginSettings,
    #[serde(default)]
    pub delivery: Delivery,
    #[serde(default)]
    pub retry: RetryConfig,
    /// Longest one plugin call may take before the client gets 504.
    #[serde(default = "default_forward_timeout")]
    pub timeout: HumanDuration,
}

impl ProviderConfig {
    /// Attempts a delivery gets in all. Unset: 5 for `sync` (the client is waiting, and
    /// `timeout` bounds them anyway) and 30 for `async`, which with the default backoff
    /// (500ms doubling up to 5m, full jitter) rides out upstream outages of an hour or more.
    pub fn max_attempts(&self) -> u32 {
        self.retry.max_attempts.unwrap_or(match self.delivery {
            Delivery::Sync => 5,
            Delivery::Async => 30,
        })
    }
}

/// Which dialects a tenant's keys may use.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DialectGrant {
    All,
    One(DialectName),
}

impl<'de> Deserialize<'de> for DialectGrant {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text == "all" {
            return Ok(Self::All);
        }
        DialectName::parse(&text).map(Self::One).ok_or_else(|| {
            de::Error::custom(format!(
                "unknown dialect `{text}`, expected `all` or one of {}",
                DialectName::ALL
                    .iter()
                    .map(|d| d.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }
}

fn default_dialects() -> Vec<DialectGrant> {
    vec![DialectGrant::All]
}

/// One entry of `tenants:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub plan: String,
    pub provider: String,
    /// API keys, plain or `sha256:<hex>` of the key: digests from the moment they are read.
    pub keys: Vec<ApiKey>,
    #[serde(default = "default_dialects")]
    pub dialects: Vec<DialectGrant>,
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub plans: BTreeMap<String, PlanConfig>,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Where it was read from (not in the file).
    #[serde(skip)]
    pub source: PathBuf,
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, Vec<ConfigError>> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            vec![ConfigError::Read {
                file: path.display().to_string(),
                source,
            }]
        })?;
        Self::parse(&text, path)
    }

    /// The directory relative paths in the config are relative to: the config file's own.
    pub fn base_dir(&self) -> &Path {
        self.source
            .parent()
            .filter(|dir| !dir.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }

    /// Parses and validates `text`, naming `path` in errors and resolving relative paths
    /// against its directory.
    pub fn parse(text: &str, path: &Path) -> Result<Self, Vec<ConfigError>> {
        let mut config: Config = serde_norway::from_str(text).map_err(|error| {
            let (line, column) = error.location().map(|l| (l.line(), l.column())).unwrap_or((1, 1));
            let message = error.to_string();
            // serde_norway appends " at line L column C"; the location is already in front.
            let message = match message.rfind(" at line ") {
                Some(cut) => message[..cut].to_owned(),
                None => message,
            };
            vec![ConfigError::at(path, line, column, message)]
        })?;
        config.source = path.to_path_buf();
        let base = config.base_dir().to_path_buf();
        resolve_relative(&base, &mut config.server.data_dir);
        resolve_relative(&base, &mut config.server.plugin_dir);
        if let Some(store) = &mut config.server.store {
            store.url.resolve_paths(&base);
        }
        if let Some(ca_file) = config
            .server
            .limits
            .as_mut()
            .and_then(|limits| limits.ca_file.as_mut())
        {
            resolve_relative(&base, ca_file);
        }
        let errors = config.validate(text);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// An error about the key at `keys`, located in the file the config was read from.
    pub(crate) fn error_at(&self, keys: &[&str], message: impl Into<String>) -> ConfigError {
        let text = std::fs::read_to_string(&self.source).unwrap_or_default();
        let (line, column) = locate(&text, keys);
        ConfigError::at(&self.source, line, column, message)
    }

    /// Cross-reference checks, each located at the key it is about.
    fn validate(&self, text: &str) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut error = |keys: &[&str], message: String| {
            let (line, column) = locate(text, keys);
            errors.push(ConfigError::at(&self.source, line, column, message));
        };
        if let Some(limits) = &self.server.limits
            && limits.ca_file.is_some()
            && !limits.url.is_tls()
        {
            error(
                &["server", "limits", "ca_file"],
                "ca_file is used only with a rediss:// (TLS) url".into(),
            );
        }
        for (name, plan) in &self.plans {
            if plan.max_file_size.0 == 0 {
                error(
                    &["plans", name, "max_file_size"],
                    "max_file_size must be greater than 0".into(),
                );
            }
            if let Some(limit) = plan.rate_limit {
                if !(MIN_REQUESTS_PER_SECOND..=MAX_REQUESTS_PER_SECOND).contains(&limit.requests_per_second) {
                    error(
                        &["plans", name, "rate_limit", "requests_per_second"],
                        format!(
                            "requests_per_second must be between {MIN_REQUESTS_PER_SECOND} (one a day) and {MAX_REQUESTS_PER_SECOND}"
                        ),
                    );
                }
                if limit.burst == 0 {
                    error(
                        &["plans", name, "rate_limit", "burst"],
                        "burst must be at least 1".into(),
                    );
                }
            }
            if let Some(extensions) = &plan.allowed_extensions {
                for extension in extensions {
                    if extension.starts_with('.') || extension.contains(['/', '\\']) {
                        error(
                            &["plans", name, "allowed_extensions"],
                            format!(
                                "extension `{extension}`: write it without a dot or slashes (e.g. `pdf`)"
                            ),
                        );
                    }
                }
            }
            if plan.max_files_per_request == Some(0) {
                error(
                    &["plans", name, "max_files_per_request"],
                    "max_files_per_request must be at least 1".into(),
                );
            }
            if plan.max_concurrent_uploads == Some(0) {
                error(
                    &["plans", name, "max_concurrent_uploads"],
                    "max_concurrent_uploads must be at least 1 (leave it out for no cap)".into(),
                );
            }
            if plan.max_open_sessions == Some(0) {
                error(
                    &["plans", name, "max_open_sessions"],
                    format!("max_open_sessions must be at least 1 (left out: {DEFAULT_MAX_OPEN_SESSIONS})"),
                );
            }
        }
        for (name, provider) in &self.providers {
            if !valid_plugin_name(&provider.plugin) {
                error(
                    &["providers", name, "plugin"],
                    format!(
                        "plugin name `{}` may only hold a-z, 0-9, `_` and `-`",
                        provider.plugin
                    ),
                );
            }
            if provider.retry.max_attempts == Some(0) {
                error(
                    &["providers", name, "retry", "max_attempts"],
                    "max_attempts must be at least 1".into(),
                );
            }
            if provider.timeout.0.is_zero() || provider.timeout.0 > MAX_PROVIDER_TIMEOUT {
                error(
                    &["providers", name, "timeout"],
                    "timeout must be more than 0 and at most 24h".into(),
                );
            }
        }
        let mut seen_keys = HashSet::new();
        for (name, tenant) in &self.tenants {
            if !self.plans.contains_key(&tenant.plan) {
                error(
                    &["tenants", name, "plan"],
                    format!(
                        "unknown plan `{}`, expected one of: {}",
                        tenant.plan,
                        names(&self.plans)
                    ),
                );
            }
            if !self.providers.contains_key(&tenant.provider) {
                error(
                    &["tenants", name, "provider"],
                    format!(
                        "unknown provider `{}`, expected one of: {}",
                        tenant.provider,
                        names(&self.providers)
                    ),
                );
            }
            if tenant.keys.is_empty() {
                error(
                    &["tenants", name, "keys"],
                    "a tenant needs at least one key".into(),
                );
            }
            for key in &tenant.keys {
                if !seen_keys.insert(key.0) {
                    error(
                        &["tenants", name, "keys"],
                        "this key is already used by another entry".into(),
                    );
                }
            }
        }
        if let Some(cors) = &self.server.cors {
            for origin in &cors.allowed_origins {
                if origin != "*" && !valid_origin(origin) {
                    error(
                        &["server", "cors", "allowed_origins"],
                        format!(
                            "origin `{origin}` must be `scheme://host[:port]` with no path or trailing slash (or \"*\")"
                        ),
                    );
                }
            }
        }
        if self.server.max_connections == 0 {
            error(
                &["server", "max_connections"],
                "max_connections must be at least 1".into(),
            );
        }
        if self.server.workers == Some(0) {
            error(
                &["server", "workers"],
                "workers must be at least 1 (leave it out for one per core)".into(),
            );
        }
        if !(MIN_SESSION_EXPIRY..=MAX_SESSION_EXPIRY).contains(&self.server.session_expiry.0) {
            // Expiry dates are written into answers and listings: a century past year 9999
            // could not be.
            error(
                &["server", "session_expiry"],
                "session_expiry must be from 1s to 365d".into(),
            );
        }
        if self.server.sweep_interval.0 < MIN_SWEEP_INTERVAL {
            error(
                &["server", "sweep_interval"],
                "sweep_interval must be at least 100ms".into(),
            );
        }
        errors
    }
}

/// The longest a provider's `timeout` may be (leases and deadlines are computed from it).
const MAX_PROVIDER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// The bounds of `session_expiry`.
const MIN_SESSION_EXPIRY: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_SESSION_EXPIRY: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);
/// The shortest `sweep_interval`: the sweep walks the spool.
const MIN_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

fn names<V>(map: &BTreeMap<String, V>) -> String {
    if map.is_empty() {
        "(none defined)".into()
    } else {
        map.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// Plugin names become file names, so they are restricted.
pub(crate) fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}
