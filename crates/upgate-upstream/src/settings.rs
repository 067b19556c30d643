//! The settings every vendor plugin shares, and typed access to each plugin's own keys.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};
use upgate_plugin_api::units::parse_byte_size;
use upgate_plugin_api::{ErrorKind, InitContext, PluginError};

use crate::response::sanitize;

/// The keys [`UpstreamSettings`] understands itself.
pub const COMMON_KEYS: [&str; 5] = ["base_url", "api_key", "connect_timeout", "timeout", "ca_file"];

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

fn config_error(message: impl Into<String>) -> PluginError {
    PluginError::new(ErrorKind::Config, message)
}

/// A provider's settings: the common upstream keys, parsed and validated, plus the
/// plugin's own keys, read through [`UpstreamSettings::string`] and friends.
///
/// `Debug` never shows the API key.
#[derive(Clone)]
pub struct UpstreamSettings {
    /// `http(s)://host[:port][/prefix]`, without a trailing slash.
    pub base_url: String,
    api_key: String,
    /// Time to connect (TCP and TLS). Default 10 s.
    pub connect_timeout: Duration,
    /// Total time for one request, body and answer included. Default 300 s.
    pub timeout: Duration,
    /// Extra PEM roots, trusted in addition to the Mozilla roots.
    pub ca_file: Option<PathBuf>,
    extra: Map<String, Value>,
}

impl fmt::Debug for UpstreamSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamSettings")
            .field("base_url", &self.base_url)
            .field("api_key", &"<redacted>")
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .field("extra", &self.extra)
            .finish()
    }
}

impl UpstreamSettings {
    /// Parses a plugin's settings map. `extra_keys` are the plugin's own keys; any other key
    /// that is not one of [`COMMON_KEYS`] is a [`ErrorKind::Config`] error naming it.
    pub fn parse(context: &InitContext, settings: Value, extra_keys: &[&str]) -> Result<Self, PluginError> {
        let mut map = match settings {
            Value::Object(map) => map,
            Value::Null => Map::new(),
            _ => return Err(config_error("settings must be a map")),
        };
        if let Some(key) = map
            .keys()
            .find(|key| !COMMON_KEYS.contains(&key.as_str()) && !extra_keys.contains(&key.as_str()))
        {
            let mut known: Vec<&str> = COMMON_KEYS.to_vec();
            known.extend_from_slice(extra_keys);
            return Err(config_error(format!(
                "unknown setting `{}` (known: {})",
                sanitize(key, 60),
                known.join(", ")
            )));
        }

        let base_url = parse_base_url(map.remove("base_url"))?;
        let api_key = match map.remove("api_key") {
            Some(Value::String(key)) if !key.is_empty() => key,
            Some(Value::String(_)) | None | Some(Value::Null) => {
                return Err(config_error("setting `api_key` is required"));
            }
            Some(_) => return Err(config_error("setting `api_key` must be a string")),
        };
        if !api_key.bytes().all(|byte| (0x21..0x7f).contains(&byte)) {
            // Never echo the key itself.
            return Err(config_error(
                "setting `api_key` must be visible ASCII without spaces",
            ));
        }
        let connect_timeout = parse_duration(
            "connect_timeout",
            map.remove("connect_timeout"),
            DEFAULT_CONNECT_TIMEOUT,
        )?;
        let timeout = parse_duration("timeout", map.remove("timeout"), DEFAULT_TIMEOUT)?;
        let ca_file = match map.remove("ca_file") {
            None | Some(Value::Null) => None,
            Some(Value::String(path)) if !path.is_empty() => Some(context.resolve(Path::new(&path))),
            Some(_) => return Err(config_error("setting `ca_file` must be a file path")),
        };
        Ok(Self {
            base_url,
            api_key,
            connect_timeout,
            timeout,
            ca_file,
            extra: map,
        })
    }

    /// The API key. Callers must never put it in an error message.
    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    /// `base_url` joined with `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// One of the plugin's own keys as a non-empty string without control characters.
    pub fn string(&self, key: &str) -> Result<Option<String>, PluginError> {
        match self.extra.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(value)) if value.is_empty() => {
                Err(config_error(format!("setting `{key}` must not be empty")))
            }
            Some(Value::String(value)) if value.chars().any(char::is_control) => Err(config_error(format!(
                "setting `{key}` contains control characters"
            ))),
            Some(Value::String(value)) => Ok(Some(value.clone())),
            Some(_) => Err(config_error(format!("setting `{key}` must be a string"))),
        }
    }

    /// One of the plugin's own keys as a list of non-empty strings (absent: empty).
    pub fn string_list(&self, key: &str) -> Result<Vec<String>, PluginError> {
        let not_a_list = || {
            PluginError::new(
                ErrorKind::Config,
                format!("setting `{key}` must be a list of strings"),
            )
        };
        match self.extra.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(values)) => values
                .iter()
                .map(|value| match value {
                    Value::String(text) if !text.is_empty() && !text.chars().any(char::is_control) => {
                        Ok(text.clone())
                    }
                    _ => Err(not_a_list()),
                })
                .collect(),
            Some(_) => Err(not_a_list()),
        }
    }

    /// [`UpstreamSettings::string`] with a default.
    pub fn string_or(&self, key: &str, default: &str) -> Result<String, PluginError> {
        Ok(self.string(key)?.unwrap_or_else(|| default.to_owned()))
    }

    /// [`UpstreamSettings::string`], required.
    pub fn required_string(&self, key: &str) -> Result<String, PluginError> {
        self.string(key)?
            .ok_or_else(|| config_error(format!("setting `{key}` is required")))
    }

    /// One of the plugin's own keys as a positive byte count: an integer, or a string in the
    /// grammar of [`upgate_plugin_api::units::parse_byte_size`] (the host config's), such as
    /// `"25MB"` (10^6), `"8MiB"` (2^20), `"1.5GiB"` or `"1g"`.
    pub fn byte_size_or(&self, key: &str, default: u64) -> Result<u64, PluginError> {
        let size = match self.extra.get(key) {
            None | Some(Value::Null) => return Ok(default),
            Some(Value::Number(number)) => number.as_u64(),
            Some(Value::String(text)) => parse_byte_size(text).ok(),
            Some(_) => None,
        };
        match size {
            Some(size) if size > 0 => Ok(size),
            _ => Err(config_error(format!(
                "setting `{key}` must be a positive byte size such as 26214400, \"25MB\" or \"8MiB\""
            ))),
        }
    }
}

fn parse_base_url(value: Option<Value>) -> Result<String, PluginError> {
    let url = match value {
        Some(Value::String(url)) if !url.is_empty() => url,
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(config_error("setting `base_url` is required"));
        }
        Some(_) => return Err(config_error("setting `base_url` must be a string")),
    };
    let shown = shown_url(&url);
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            config_error(format!(
                "setting `base_url` must start with http:// or https://: {shown}"
            ))
        })?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(config_error(format!("setting `base_url` has no host: {shown}")));
    }
    if authority.contains('@') {
        return Err(config_error(
            "setting `base_url` must not carry credentials; use `api_key`",
        ));
    }
    if url.contains(['?', '#']) || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(config_error(format!(
            "setting `base_url` must be a plain URL without query: {shown}"
        )));
    }
    if url.parse::<ureq::http::Uri>().is_err() {
        return Err(config_error(format!(
            "setting `base_url` is not a valid URL: {shown}"
        )));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// A `base_url` as an error message may show it: without its query or fragment, and without
/// the credentials of its authority (either may hold a secret).
fn shown_url(url: &str) -> String {
    let plain = url.split(['?', '#']).next().unwrap_or_default();
    let shown = match plain.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}{path}")
        }
        None => plain.to_owned(),
    };
    sanitize(&shown, 120)
}

fn parse_duration(key: &str, value: Option<Value>, default: Duration) -> Result<Duration, PluginError> {
    let duration = match value {
        None | Some(Value::Null) => return Ok(default),
        Some(Value::Number(number)) => number.as_u64().map(Duration::from_secs),
        Some(Value::String(text)) => {
            let text = text.trim();
            match text.parse::<u64>() {
                Ok(secs) => Some(Duration::from_secs(secs)),
                Err(_) => humantime::parse_duration(text).ok(),
            }
        }
        Some(_) => None,
    };
    match duration {
        Some(duration) if !duration.is_zero() => Ok(duration),
        _ => Err(config_error(format!(
            "setting `{key}` must be a positive duration such as \"30s\", \"5m\" or a number of seconds"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_relative_ca_file_is_relative_to_the_config_directory() {
        let context = InitContext {
            config_dir: PathBuf::from("/etc/upgate"),
            durable: false,
        };
        let parse = |ca_file: &str| {
            UpstreamSettings::parse(
                &context,
                json!({"base_url": "https://h", "api_key": "k", "ca_file": ca_file}),
                &[],
            )
            .unwrap()
            .ca_file
        };
        assert_eq!(
            parse("certs/ca.pem"),
            Some(PathBuf::from("/etc/upgate/certs/ca.pem"))
        );
        assert_eq!(parse("/opt/ca.pem"), Some(PathBuf::from("/opt/ca.pem")));
    }

    #[test]
    fn parses_common_settings_and_defaults() {
        let settings = UpstreamSettings::parse(
            &InitContext::default(),
            json!({"base_url": "https://api.dify.ai/v1/", "api_key": "k-123"}),
            &[],
        )
        .unwrap();
        assert_eq!(settings.base_url, "https://api.dify.ai/v1");
        assert_eq!(
            settings.url("/files/upload"),
            "https://api.dify.ai/v1/files/upload"
        );
        assert_eq!(settings.connect_timeout, Duration::from_secs(10));
        assert_eq!(settings.timeout, Duration::from_secs(300));
        assert!(!format!("{settings:?}").contains("k-123"));

        let settings = UpstreamSettings::parse(
            &InitContext::default(),
            json!({"base_url": "http://h:1", "api_key": "k", "timeout": "5m", "connect_timeout": 3,
                   "chunk_size": "8MiB", "user": "bob"}),
            &["chunk_size", "user"],
        )
        .unwrap();
        assert_eq!(settings.timeout, Duration::from_secs(300));
        assert_eq!(settings.connect_timeout, Duration::from_secs(3));
        assert_eq!(settings.byte_size_or("chunk_size", 1).unwrap(), 8 << 20);
        assert_eq!(settings.byte_size_or("missing", 7).unwrap(), 7);
        assert_eq!(settings.string_or("user", "x").unwrap(), "bob");
        assert_eq!(settings.string_or("other", "x").unwrap(), "x");
    }

    #[test]
    fn rejects_bad_settings_without_leaking_the_key() {
        let error = |value: Value, extra: &[&str]| {
            UpstreamSettings::parse(&InitContext::default(), value, extra).unwrap_err()
        };
        let unknown = error(
            json!({"base_url": "http://h", "api_key": "secret", "colour": 1}),
            &[],
        );
        assert_eq!(unknown.kind, ErrorKind::Config);
        assert!(unknown.message.contains("`colour`"), "{}", unknown.message);
        assert!(error(json!({"api_key": "k"}), &[]).message.contains("base_url"));
        assert!(
            error(json!({"base_url": "ftp://h", "api_key": "k"}), &[])
                .message
                .contains("http")
        );
        assert!(
            error(json!({"base_url": "http://u:p@h", "api_key": "k"}), &[])
                .message
                .contains("credentials")
        );
        assert!(
            error(json!({"base_url": "http://h"}), &[])
                .message
                .contains("api_key")
        );
        let bad_key = error(json!({"base_url": "http://h", "api_key": "sec ret\n"}), &[]);
        assert!(!bad_key.message.contains("sec"));
        assert!(
            error(
                json!({"base_url": "http://h", "api_key": "k", "timeout": "soon"}),
                &[]
            )
            .message
            .contains("timeout")
        );
        assert!(
            error(json!({"base_url": "http://h", "api_key": "k", "timeout": 0}), &[])
                .message
                .contains("timeout")
        );
        assert_eq!(error(json!([1]), &[]).kind, ErrorKind::Config);
        // A secret in the URL's credentials or query is never shown back.
        for url in [
            "ftp://user:pw-SECRET@h/x",
            "http://h/?token=SECRET",
            "http://h/#SECRET",
        ] {
            let message = error(json!({"base_url": url, "api_key": "k"}), &[]).message;
            assert!(!message.contains("SECRET"), "{message}");
        }
        let message = error(json!({"base_url": "ftp://user:pw@h/x", "api_key": "k"}), &[]).message;
        assert!(message.ends_with("ftp://h/x"), "{message}");
    }

    #[test]
    fn byte_size_settings() {
        // The grammar itself is tested with `upgate_plugin_api::units`.
        let settings = UpstreamSettings::parse(
            &InitContext::default(),
            json!({"base_url": "http://h", "api_key": "k", "a": "2.5MB", "b": 1024, "c": "1g",
                   "zero": "0", "unit": "10XB", "float": 1.5, "list": [1]}),
            &["a", "b", "c", "zero", "unit", "float", "list"],
        )
        .unwrap();
        assert_eq!(settings.byte_size_or("a", 1).unwrap(), 2_500_000);
        assert_eq!(settings.byte_size_or("b", 1).unwrap(), 1024);
        assert_eq!(settings.byte_size_or("c", 1).unwrap(), 1_000_000_000);
        for key in ["zero", "unit", "float", "list"] {
            let error = settings.byte_size_or(key, 1).unwrap_err();
            assert_eq!(error.kind, ErrorKind::Config);
            assert!(
                error
                    .message
                    .contains(&format!("`{key}` must be a positive byte size")),
                "{}",
                error.message
            );
        }
    }
}
