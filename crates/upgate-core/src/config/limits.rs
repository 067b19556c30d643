//! `server.limits:`: where rate limits and tenant concurrency are counted when several nodes
//! share them.
//!
//! What flows through here: the `url` of a Redis server (`${VAR}` expanded), checked when
//! the config is read and kept as a [`RedisUrl`], whose `Debug` and `Display` never show the
//! password, and `fault_tolerant`: what a node does while Redis cannot be reached. A
//! `rediss://` URL is TLS, the server's certificate verified (the system's roots, or
//! `ca_file` in their place); its `#insecure`, which would verify nothing, is refused.

use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, Deserializer};

use super::default_true;
use super::units::expand_env;

#[cfg(test)]
mod tests;

/// `server.limits:` (absent: every limit in this process).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`, `rediss://...` (TLS) or
    /// `redis+unix:///PATH`.
    pub url: RedisUrl,
    /// With `rediss://`: the PEM certificates of the CA(s) the server's certificate must chain
    /// to, in place of the system's roots (relative to the config file's directory).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Redis unreachable: `true` (the default) counts on this node's own limits meanwhile;
    /// `false` refuses the requests that need a shared limit with 503.
    #[serde(default = "default_true")]
    pub fault_tolerant: bool,
}

/// A Redis connection URL. Shown as `redis://USER:***@HOST:PORT/DB`.
#[derive(Clone)]
pub struct RedisUrl {
    url: String,
    shown: String,
}

const EXPECTED: &str =
    "expected redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... (TLS) or redis+unix:///PATH";

impl RedisUrl {
    /// Checks `text` is a `redis://` (or `redis+unix://`) URL the driver understands. The
    /// error never repeats the URL (it may hold a password).
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        use redis::IntoConnectionInfo;

        let Some((scheme, _)) = text.split_once("://") else {
            return Err(format!("not a URL: {EXPECTED}"));
        };
        if !matches!(scheme, "redis" | "rediss" | "redis+unix") {
            let scheme: String = scheme.chars().take(16).collect();
            return Err(format!("unsupported scheme `{scheme}`: {EXPECTED}"));
        }
        if text.contains('#') {
            return Err(format!(
                "a `#` fragment (`#insecure` would accept any certificate): the server's certificate is always verified; {EXPECTED}"
            ));
        }
        let info = text.into_connection_info().map_err(|error| {
            // The driver's text is "what is wrong - Kind: detail"; only what is wrong is kept
            // (it never quotes the URL, a detail may).
            let message = error.to_string();
            let message = message.split(" - ").next().unwrap_or_default();
            format!("not a valid Redis URL ({message}); {EXPECTED}")
        })?;
        Ok(Self {
            url: text.to_owned(),
            shown: redacted(scheme, &info),
        })
    }

    /// The URL with its password, for the driver only: never print it.
    pub(crate) fn expose(&self) -> &str {
        &self.url
    }

    /// A `rediss://` URL.
    pub(crate) fn is_tls(&self) -> bool {
        self.url.starts_with("rediss://")
    }
}

/// The URL rebuilt from its parsed parts (user, host, port or path, database), so nothing of
/// the password (in the user info or a `password=` parameter) can be in it.
fn redacted(scheme: &str, info: &redis::ConnectionInfo) -> String {
    let settings = info.redis_settings();
    let user = settings.username().unwrap_or_default();
    let password = settings.password().is_some();
    let db = settings.db();
    match info.addr() {
        redis::ConnectionAddr::Unix(path) => {
            // redis+unix:///PATH?db=N&user=U&pass=P: the settings are parameters.
            let mut parameters = Vec::new();
            if db != 0 {
                parameters.push(format!("db={db}"));
            }
            if !user.is_empty() {
                parameters.push(format!("user={user}"));
            }
            if password {
                parameters.push("pass=***".to_owned());
            }
            let mut shown = format!("{scheme}://{}", path.display());
            if !parameters.is_empty() {
                shown.push('?');
                shown.push_str(&parameters.join("&"));
            }
            shown
        }
        address => {
            let mut shown = format!("{scheme}://");
            if password {
                shown.push_str(&format!("{user}:***@"));
            } else if !user.is_empty() {
                shown.push_str(&format!("{user}@"));
            }
            match address {
                redis::ConnectionAddr::Tcp(host, port) | redis::ConnectionAddr::TcpTls { host, port, .. }
                    if host.contains(':') =>
                {
                    shown.push_str(&format!("[{host}]:{port}"));
                }
                redis::ConnectionAddr::Tcp(host, port) | redis::ConnectionAddr::TcpTls { host, port, .. } => {
                    shown.push_str(&format!("{host}:{port}"));
                }
                _ => shown.push('?'),
            }
            if db != 0 {
                shown.push_str(&format!("/{db}"));
            }
            shown
        }
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RedisUrl").field(&self.shown).finish()
    }
}

impl<'de> Deserialize<'de> for RedisUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // `${VAR}` expanded as in every string of the config, with an error that does not
        // repeat the text (it may hold a password).
        let raw = String::deserialize(deserializer)?;
        let text = expand_env(&raw).map_err(|error| de::Error::custom(error.replace(&raw, "the URL")))?;
        Self::parse(&text).map_err(de::Error::custom)
    }
}
