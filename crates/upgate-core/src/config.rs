//! Configuration: the YAML file in, a validated [`Config`] out.
//!
//! What flows through here: the text of `config.yaml` (parsed with `serde_norway`, the
//! maintained fork of the deprecated `serde_yaml`), `${VAR}` references resolved from the
//! environment, sizes (`10MiB`) and durations (`30s`) parsed, relative paths resolved against
//! the config file's directory, and cross-references (plans, providers, dialects) checked.
//! Every error names the file, line and column and what was expected.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};

use crate::dialects::DialectName;

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

/// A byte count written as `10MiB`, `25MB`, `512KiB`, `1GiB` or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `10MiB`, `25 MB`, `1024`, `1.5GiB`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        if number.is_empty() {
            return Err(format!("`{text}` is not a size (expected e.g. 10MiB)"));
        }
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` in `{text}` (expected B, KB, KiB, MB, MiB, GB, GiB, TB or TiB)"
                ));
            }
        };
        let value: f64 = number
            .parse()
            .map_err(|_| format!("`{text}` is not a size (expected e.g. 10MiB)"))?;
        let bytes = value * multiplier as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("size `{text}` is out of range"));
        }
        Ok(Self(bytes.round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        for (size, unit) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)
            .map_err(|_| de::Error::custom("expected a size such as 10MiB"))?
        {
            Raw::Number(bytes) => Ok(Self(bytes)),
            Raw::Text(text) => Self::parse(&text).map_err(de::Error::custom),
        }
    }
}

/// A duration written as `30s`, `5m`, `24h`, `250ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(text.trim()).map(Self).map_err(|error| {
            de::Error::custom(format!(
                "`{text}` is not a duration ({error}); expected e.g. 30s, 5m, 24h"
            ))
        })
    }
}

/// A string in which `${VAR}` is replaced from the environment when the config is read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EnvString(pub String);

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        expand_env(&text).map(Self).map_err(de::Error::custom)
    }
}

/// A path in which `${VAR}` is replaced (e.g. `data_dir: ${STATE_DIRECTORY}` under systemd).
fn env_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
    EnvString::deserialize(deserializer).map(|text| PathBuf::from(text.0))
}

/// Replaces each `${NAME}` in `text` with the environment variable `NAME`. `$$` is a literal
/// `$`. An unset variable is an error naming it.
pub fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unterminated `${{` in `{text}`"))?;
            let name = &body[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "`${{{name}}}` is not a valid environment variable reference"
                ));
            }
            let value = std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?;
            out.push_str(&value);
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Plugin settings: free-form, with `${VAR}` expanded in every string.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PluginSettings(pub serde_json::Value);

impl<'de> Deserialize<'de> for PluginSettings {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        fn expand(value: &mut serde_json::Value) -> Result<(), String> {
            match value {
                serde_json::Value::String(text) => *text = expand_env(text)?,
                serde_json::Value::Array(items) => items.iter_mut().try_for_each(expand)?,
                serde_json::Value::Object(map) => map.values_mut().try_for_each(expand)?,
                _ => {}
            }
            Ok(())
        }
        let mut value = serde_json::Value::deserialize(deserializer)?;
        expand(&mut value).map_err(de::Error::custom)?;
        Ok(Self(value))
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
    /// Global cap on uploads in progress (0 = none).
    #[serde(default)]
    pub max_concurrent_uploads: usize,
    /// Plugin calls running at once (they run on blocking threads).
    #[serde(default = "default_forward_concurrency")]
    pub forward_concurrency: usize,
    #[serde(default)]
    pub log_format: LogFormat,
}

/// Bounds of `rate_limit.requests_per_second`: one request a day up to one a microsecond,
/// so the replenish period is always a whole, representable number of nanoseconds.
pub const MIN_REQUESTS_PER_SECOND: f64 = 1.0 / 86_400.0;
pub const MAX_REQUESTS_PER_SECOND: f64 = 1_000_000.0;

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
}

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
    /// API keys, plain or `sha256:<hex>` of the key.
    pub keys: Vec<EnvString>,
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
        for dir in [&mut config.server.data_dir, &mut config.server.plugin_dir] {
            if dir.is_relative() {
                *dir = base.join(dir.strip_prefix(".").unwrap_or(dir));
            }
        }
        let errors = config.validate(text);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// Cross-reference checks, each located at the key it is about.
    fn validate(&self, text: &str) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut error = |keys: &[&str], message: String| {
            let (line, column) = locate(text, keys);
            errors.push(ConfigError::at(&self.source, line, column, message));
        };
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
                match crate::policy::KeyDigest::from_config(&key.0) {
                    Err(message) => error(&["tenants", name, "keys"], message),
                    Ok(digest) => {
                        if !seen_keys.insert(digest) {
                            error(
                                &["tenants", name, "keys"],
                                "this key is already used by another entry".into(),
                            );
                        }
                    }
                }
            }
        }
        if self.server.max_connections == 0 {
            error(
                &["server", "max_connections"],
                "max_connections must be at least 1".into(),
            );
        }
        errors
    }
}

fn names<V>(map: &BTreeMap<String, V>) -> String {
    if map.is_empty() {
        "(none defined)".into()
    } else {
        map.keys().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// Plugin names become file names, so they are restricted.
pub fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Finds the line and column of a nested block-style key (`tenants` > `demo` > `plan`) in
/// YAML text; falls back to the deepest key found. 1-based.
fn locate(text: &str, keys: &[&str]) -> (usize, usize) {
    let mut best = (1, 1);
    let mut depth = 0;
    let mut parent_indent: Option<usize> = None;
    for (number, line) in text.lines().enumerate() {
        if depth == keys.len() {
            break;
        }
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let indent = line.len() - trimmed.len();
        if parent_indent.is_some_and(|parent| indent <= parent) {
            // Left the parent's block without finding the key.
            break;
        }
        let key = trimmed
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches(['"', '\'']);
        if key == keys[depth] && trimmed.contains(':') {
            best = (number + 1, indent + 1);
            parent_indent = Some(indent);
            depth += 1;
            // Flow style (`demo: { plan: x }`): the rest is on this line.
            if let Some(rest_keys) = keys.get(depth..) {
                let mut column = indent + key.len();
                for rest in rest_keys {
                    if let Some(found) = line[column..].find(&format!("{rest}:")) {
                        column += found;
                        best = (number + 1, column + 1);
                        depth += 1;
                    } else {
                        break;
                    }
                }
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "server:\n  listen: 127.0.0.1:0\n  data_dir: data\nplans:\n  free:\n    max_file_size: 10MiB\n    allowed_extensions: [png, txt]\n    rate_limit: { requests_per_second: 5, burst: 10 }\nproviders:\n  disk: { plugin: local, settings: { root: ./files } }\ntenants:\n  demo:\n    plan: free\n    provider: disk\n    keys: [demo-key]\n";

    fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
        Config::parse(text, Path::new("/etc/upgate/config.yaml"))
    }

    fn first_error(text: &str) -> String {
        parse(text).unwrap_err().remove(0).to_string()
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("10MiB").unwrap().0, 10 << 20);
        assert_eq!(ByteSize::parse("25MB").unwrap().0, 25_000_000);
        assert_eq!(ByteSize::parse("1.5 GiB").unwrap().0, 3 << 29);
        assert_eq!(ByteSize::parse("1024").unwrap().0, 1024);
        assert_eq!(ByteSize::parse("0").unwrap().0, 0);
        assert!(ByteSize::parse("10XB").unwrap_err().contains("unknown size unit"));
        assert!(ByteSize::parse("MiB").is_err());
        assert!(ByteSize::parse("-1MiB").is_err());
        assert_eq!(ByteSize(10 << 20).to_string(), "10MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000 bytes");
    }

    #[test]
    fn env_expansion() {
        // cargo sets CARGO_PKG_NAME for the test process.
        assert_eq!(
            expand_env("a ${CARGO_PKG_NAME} b $$ c $x").unwrap(),
            "a upgate-core b $ c $x"
        );
        assert_eq!(
            expand_env("${UPGATE_TEST_UNSET_VAR}").unwrap_err(),
            "environment variable UPGATE_TEST_UNSET_VAR is not set"
        );
        assert!(expand_env("${bad name}").is_err());
        assert!(expand_env("${OPEN").is_err());
        // Server paths too (cargo sets CARGO_MANIFEST_DIR, an absolute path).
        let config = parse(&GOOD.replace("data_dir: data", "data_dir: ${CARGO_MANIFEST_DIR}/state")).unwrap();
        assert_eq!(
            config.server.data_dir,
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/state"))
        );
        let errors =
            parse(&GOOD.replace("data_dir: data", "data_dir: ${UPGATE_TEST_UNSET_DIR}")).unwrap_err();
        assert!(
            errors[0].to_string().contains("UPGATE_TEST_UNSET_DIR"),
            "{errors:?}"
        );
    }

    #[test]
    fn parses_the_good_config_and_resolves_paths() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.server.data_dir, PathBuf::from("/etc/upgate/data"));
        assert_eq!(
            config.server.plugin_dir,
            PathBuf::from("/etc/upgate/target/release")
        );
        assert_eq!(config.plans["free"].max_file_size.0, 10 << 20);
        assert_eq!(config.server.idle_timeout.0, Duration::from_secs(30));
        assert_eq!(config.tenants["demo"].dialects, vec![DialectGrant::All]);
        assert!(config.plans["free"].verify_content);
    }

    #[test]
    fn unknown_field_is_located() {
        let text = GOOD.replace("    provider: disk\n", "    provider: disk\n    colour: blue\n");
        let message = first_error(&text);
        assert!(message.starts_with("/etc/upgate/config.yaml:15:5: "), "{message}");
        assert!(message.contains("unknown field `colour`"), "{message}");
    }

    #[test]
    fn bad_size_is_located() {
        let message = first_error(&GOOD.replace("10MiB", "10XB"));
        assert!(
            message.starts_with("/etc/upgate/config.yaml:6:5: plans.free: "),
            "{message}"
        );
        assert!(message.contains("unknown size unit"), "{message}");
    }

    #[test]
    fn unknown_plan_is_located_and_lists_the_choices() {
        let message = first_error(&GOOD.replace("plan: free", "plan: gold"));
        assert_eq!(
            message,
            "/etc/upgate/config.yaml:13:5: unknown plan `gold`, expected one of: free"
        );
    }

    #[test]
    fn unknown_provider_in_flow_style() {
        let text = GOOD.replace(
            "  demo:\n    plan: free\n    provider: disk\n    keys: [demo-key]\n",
            "  demo: { plan: free, provider: nowhere, keys: [k] }\n",
        );
        let message = first_error(&text);
        assert!(
            message.starts_with("/etc/upgate/config.yaml:12:23: unknown provider `nowhere`"),
            "{message}"
        );
    }

    #[test]
    fn unset_variable_is_named_and_located() {
        let text = GOOD.replace("root: ./files", "root: \"${UPGATE_TEST_NOT_SET_ROOT}\"");
        let message = first_error(&text);
        assert!(
            message.contains("environment variable UPGATE_TEST_NOT_SET_ROOT is not set"),
            "{message}"
        );
        assert!(message.starts_with("/etc/upgate/config.yaml:10:"), "{message}");
    }

    #[test]
    fn bad_listen_address_and_dialect() {
        let message = first_error(&GOOD.replace("127.0.0.1:0", "localhost"));
        assert!(message.starts_with("/etc/upgate/config.yaml:2:11: "), "{message}");
        let text = GOOD.replace("keys: [demo-key]", "keys: [demo-key]\n    dialects: [dify, fax]");
        let message = first_error(&text);
        assert!(message.contains("unknown dialect `fax`"), "{message}");
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let text = format!("{GOOD}  other:\n    plan: free\n    provider: disk\n    keys: [demo-key]\n");
        let message = first_error(&text);
        assert!(message.contains("already used"), "{message}");
        assert!(message.starts_with("/etc/upgate/config.yaml:19:5"), "{message}");
    }
}
