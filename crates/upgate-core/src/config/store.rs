//! `server.store:`: where records live when they are shared between nodes.
//!
//! What flows through here: the `url` of a PostgreSQL database (`${VAR}` expanded), checked
//! when the config is read and kept as a [`PostgresUrl`], whose `Debug` and `Display` never
//! show the password: check-config output, logs and errors print the redacted form only. Its
//! TLS parameters, libpq's names, are taken out of the URL here: `sslmode=verify-full` (and
//! `require`, `verify-ca`, which upgate makes as strict) means TLS with the server's
//! certificate verified, host name included, against `sslrootcert` or else the Mozilla roots
//! ([`PostgresTls`]); `disable` or none, plaintext; `prefer` and `allow`, which fall back to
//! plaintext without a word, are refused.

use std::fmt;
use std::path::{Path, PathBuf};

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
    /// What the driver is given: the URL without upgate's TLS parameters.
    url: String,
    shown: String,
    tls: Option<PostgresTls>,
}

/// TLS to PostgreSQL, the server's certificate always verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PostgresTls {
    /// `sslrootcert`: the PEM certificates of the CA(s) the server's must chain to, in place of
    /// the Mozilla roots (relative to the config file's directory).
    pub(crate) ca_file: Option<PathBuf>,
}

/// Takes libpq's TLS parameters out of `text`'s query: the URL for the driver (`sslmode`
/// `require` or `disable` only, no `sslrootcert`), and the TLS to use. The query starts at the
/// first `?` after the user info (the driver reads that up to the first `@`, so a password may
/// hold a `?`); keys are compared percent-decoded, as the driver reads them, and a TLS
/// parameter given twice is refused (the driver would take the last one).
fn split_tls(text: &str) -> Result<(String, Option<PostgresTls>), String> {
    let after_scheme = text.find("://").map_or(0, |at| at + 3);
    let after_user_info = text[after_scheme..]
        .find('@')
        .map_or(after_scheme, |at| after_scheme + at + 1);
    let Some(query_at) = text[after_user_info..].find('?').map(|at| after_user_info + at) else {
        return Ok((text.to_owned(), None));
    };
    let (base, query) = (&text[..query_at], &text[query_at + 1..]);
    let mut kept = Vec::new();
    let mut mode: Option<bool> = None;
    let mut ca_file = None;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (raw_key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(raw_key).ok_or("a URL parameter name is not valid percent-encoding")?;
        match key.as_str() {
            "sslmode" => {
                if mode.is_some() {
                    return Err("sslmode is given twice".into());
                }
                let value = percent_decode(value).ok_or("sslmode is not valid percent-encoding")?;
                match value.as_str() {
                    "disable" => {
                        mode = Some(false);
                        kept.push("sslmode=disable".to_owned());
                    }
                    "require" | "verify-ca" | "verify-full" => {
                        mode = Some(true);
                        kept.push("sslmode=require".to_owned());
                    }
                    "prefer" | "allow" => {
                        return Err(format!(
                            "sslmode={value} falls back to plaintext without a word: use sslmode=verify-full \
                             (TLS, the server's certificate verified; `sslrootcert` names a private CA) or \
                             sslmode=disable"
                        ));
                    }
                    _ => return Err("sslmode is one of disable, require, verify-ca, verify-full".into()),
                }
            }
            "sslrootcert" => {
                if ca_file.is_some() {
                    return Err("sslrootcert is given twice".into());
                }
                let path = percent_decode(value).ok_or("sslrootcert is not a valid path")?;
                if path.is_empty() {
                    return Err("sslrootcert is empty".into());
                }
                ca_file = Some(PathBuf::from(path));
            }
            _ => kept.push(pair.to_owned()),
        }
    }
    let tls = mode == Some(true);
    if ca_file.is_some() && !tls {
        return Err("sslrootcert is used only with sslmode=verify-full".into());
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, tls.then_some(PostgresTls { ca_file })))
}

/// `%XX` escapes decoded as the driver decodes them (an invalid escape stays as it is);
/// `None` for text that does not decode to UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
        .map(std::borrow::Cow::into_owned)
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
        let (text, tls) = split_tls(text).map_err(|message| format!("{message}; {EXPECTED}"))?;
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
        // What the driver read must be what upgate read: TLS exactly when upgate connects with
        // it (an sslmode the parameters above missed would otherwise go unnoticed).
        let driver_tls = parsed.get_ssl_mode() == tokio_postgres::config::SslMode::Require;
        if driver_tls != tls.is_some() {
            return Err(format!(
                "the URL's sslmode cannot be read unambiguously; {EXPECTED}"
            ));
        }
        if tls.is_some() {
            if parsed
                .get_hosts()
                .iter()
                .any(|host| matches!(host, tokio_postgres::config::Host::Unix(_)))
            {
                return Err(format!(
                    "TLS (sslmode) goes over TCP only: a Unix socket host is local already; {EXPECTED}"
                ));
            }
            if parsed.get_channel_binding() == tokio_postgres::config::ChannelBinding::Require {
                return Err(format!(
                    "channel_binding=require is not supported (TLS is verified with the server's \
                     certificate instead); {EXPECTED}"
                ));
            }
        }
        Ok(Self {
            shown: redacted(scheme, &parsed),
            url: text,
            tls,
        })
    }

    /// The URL with its password, for the driver only: never print it.
    pub(crate) fn expose(&self) -> &str {
        &self.url
    }

    /// TLS to the server, when the URL asks for it.
    pub(crate) fn tls(&self) -> Option<&PostgresTls> {
        self.tls.as_ref()
    }

    /// A relative `sslrootcert` taken as relative to `base` (the config file's directory).
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        if let Some(PostgresTls { ca_file: Some(path) }) = &mut self.tls {
            super::resolve_relative(base, path);
        }
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
