//! Units of the config file: byte sizes, durations, and strings with `${VAR}` expanded.
//!
//! What flows through here: scalar YAML values in, typed values out. Byte sizes share one
//! parser with plugin settings (`upgate_plugin_api::units`).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer};

/// A byte count written as `10MiB`, `25MB`, `512KiB`, `1GiB` or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `10MiB`, `25 MB`, `1024`, `1.5GiB`: the grammar plugin settings share.
    pub fn parse(text: &str) -> Result<Self, String> {
        upgate_plugin_api::units::parse_byte_size(text).map(Self)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&upgate_plugin_api::units::format_byte_size(self.0))
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
pub(crate) struct EnvString(pub String);

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        expand_env(&text).map(Self).map_err(de::Error::custom)
    }
}

/// A path in which `${VAR}` is replaced (e.g. `data_dir: ${STATE_DIRECTORY}` under systemd).
pub(crate) fn env_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<PathBuf, D::Error> {
    EnvString::deserialize(deserializer).map(|text| PathBuf::from(text.0))
}

/// Replaces each `${NAME}` in `text` with the environment variable `NAME`. `$$` is a literal
/// `$`. An unset variable is an error naming it.
pub(crate) fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('{') {
            // Neither error repeats the value: it may be a key or a password.
            let end = body
                .find('}')
                .ok_or_else(|| "an unterminated `${` (write `$$` for a literal `$`)".to_owned())?;
            let name = &body[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(
                    "a `${...}` that is not an environment variable name (letters, digits, `_`; write `$$` for a literal `$`)"
                        .to_owned(),
                );
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
