//! `server.store:`: where records live when they are shared between nodes.
//!
//! What flows through here: the `url` of a PostgreSQL database (`${VAR}` expanded), checked
//! when the config is read and kept as a [`PostgresUrl`], whose `Debug` and `Display` never
//! show the password: check-config output, logs and errors print the redacted form only.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer};

use super::units::expand_env;

#[cfg(test)]
mod tests;

/// `server.store:` (absent: SQLite in `data_dir`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://USER:PASSWORD@HOST:PORT/DB`.
    pub url: PostgresUrl,
}

/// A PostgreSQL connection URL. Shown as `postgres://USER:***@HOST:PORT/DB`.
#[derive(Clone)]
pub struct PostgresUrl {
    url: String,
    shown: String,
}

impl PostgresUrl {
    /// Checks `text` is a `postgres://` (or `postgresql://`) URL the driver understands. The
    /// error never repeats the URL (it may hold a password).
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        const EXPECTED: &str = "expected postgres://USER:PASSWORD@HOST:PORT/DB";
        let Some((scheme, _)) = text.split_once("://") else {
            return Err(format!("not a URL: {EXPECTED}"));
        };
        if !matches!(scheme, "postgres" | "postgresql") {
            let scheme: String = scheme.chars().take(16).collect();
            return Err(format!(
                "unsupported scheme `{scheme}`: {EXPECTED} (the store is SQLite in data_dir when server.store is absent)"
            ));
        }
        let parsed: tokio_postgres::Config = text.parse().map_err(|error: tokio_postgres::Error| {
            let mut message = error.to_string();
            if let Some(cause) = std::error::Error::source(&error) {
                let cause = cause.to_string();
                // "unexpected character ... but got `x`" would show a character of the URL.
                let cause = cause.split(" but got").next().unwrap_or_default();
                message = format!("{message}: {cause}");
            }
            format!("not a valid PostgreSQL URL ({message}); {EXPECTED}")
        })?;
        if parsed.get_hosts().is_empty() {
            return Err(format!("the URL names no host; {EXPECTED}"));
        }
        Ok(Self {
            url: text.to_owned(),
            shown: redacted(scheme, &parsed),
        })
    }

    /// The URL with its password, for the driver only: never print it.
    pub(crate) fn expose(&self) -> &str {
        &self.url
    }
}

/// The URL rebuilt from its parsed parts (user, hosts, ports, database), so nothing of the
/// password (in the user info or a `password=` parameter) can be in it.
fn redacted(scheme: &str, config: &tokio_postgres::Config) -> String {
    let mut shown = format!("{scheme}://");
    if let Some(user) = config.get_user() {
        shown.push_str(user);
        if config.get_password().is_some() {
            shown.push_str(":***");
        }
        shown.push('@');
    }
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(index, host)| {
            let name = match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            };
            match ports.get(index).or(ports.first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    shown.push_str(&hosts.join(","));
    if let Some(dbname) = config.get_dbname() {
        shown.push('/');
        shown.push_str(dbname);
    }
    shown
}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PostgresUrl").field(&self.shown).finish()
    }
}

impl<'de> Deserialize<'de> for PostgresUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // `${VAR}` expanded as in every string of the config (`EnvString`'s expansion), with
        // an error that does not repeat the text (it may hold a password).
        let raw = String::deserialize(deserializer)?;
        let text = expand_env(&raw).map_err(|error| de::Error::custom(error.replace(&raw, "the URL")))?;
        Self::parse(&text).map_err(de::Error::custom)
    }
}
