//! The plugin host: finds provider plugins by name, loads them, creates one instance per
//! configured provider and calls it.
//!
//! What flows through here: `providers:` entries from config (plugin name + settings) in,
//! [`Provider`] handles out; at upload time a [`PutRequest`] (metadata and the spool path) is
//! serialized to JSON, handed to the plugin on a blocking thread by the caller, and the
//! plugin's JSON answer comes back as a [`PutResult`] or a [`PluginError`]. A panicking
//! plugin is caught on its side of the boundary and arrives here as `ErrorKind::Panic`.

mod loader;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use upgate_plugin_api::{
    DeleteRequest, ErrorKind, InitContext, InitRequest, PluginError, PutRequest, PutResult, STATUS_PANIC,
    StreamRequest,
};

pub use loader::LoadedPlugin;
pub(crate) use loader::{BodyRead, BodySource};
use loader::{Call, RawInstance};

use crate::config::{Config, Durability, ProviderConfig};
use crate::vocab::is_unseen_control;

/// Loading or initialising a plugin failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PluginHostError {
    #[error(
        "plugin `{name}`: no file {file} (looked in server.plugin_dir; build it with `cargo build --release --workspace`)"
    )]
    Missing { name: String, file: String },
    #[error("plugin file {file}: cannot load: {message}")]
    Open { file: String, message: String },
    #[error("plugin file {file}: no `{symbol}` symbol: not an upgate provider plugin")]
    NoEntry { file: String, symbol: String },
    #[error(
        "plugin file {file} was built for plugin ABI version {plugin}, but this upgate speaks ABI version {host}; rebuild the plugin against this upgate"
    )]
    AbiVersion { file: String, plugin: u32, host: u32 },
    #[error("plugin file {file}: {message}")]
    Abi { file: String, message: String },
    #[error("provider `{provider}` (plugin `{plugin}`): settings refused: {message}")]
    Init {
        provider: String,
        plugin: String,
        message: String,
    },
}

/// The file name a plugin called `name` has on this platform.
pub(crate) fn plugin_file_name(name: &str) -> String {
    format!(
        "{}upgate_plugin_{}{}",
        std::env::consts::DLL_PREFIX,
        name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    )
}

/// Opens the plugin file at `path`, once per process (libraries stay loaded).
fn open_cached(path: &Path) -> Result<Arc<LoadedPlugin>, PluginHostError> {
    static OPENED: OnceLock<Mutex<HashMap<PathBuf, Arc<LoadedPlugin>>>> = OnceLock::new();
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut opened = OPENED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(plugin) = opened.get(&canonical) {
        return Ok(plugin.clone());
    }
    let plugin = Arc::new(LoadedPlugin::open(&canonical)?);
    opened.insert(canonical, plugin.clone());
    Ok(plugin)
}

/// Loads the plugin called `name` from `plugin_dir`.
pub(crate) fn load(plugin_dir: &Path, name: &str) -> Result<Arc<LoadedPlugin>, PluginHostError> {
    let path = plugin_dir.join(plugin_file_name(name));
    if !path.is_file() {
        return Err(PluginHostError::Missing {
            name: name.to_owned(),
            file: path.display().to_string(),
        });
    }
    open_cached(&path)
}

/// A plugin file, loaded and checked, or why not.
pub(crate) type Loaded = Result<Arc<LoadedPlugin>, PluginHostError>;

/// Every plugin file in `plugin_dir`, loaded and checked (for `upgate plugins list`).
pub fn discover(plugin_dir: &Path) -> std::io::Result<Vec<(PathBuf, Loaded)>> {
    let prefix = format!("{}upgate_plugin_", std::env::consts::DLL_PREFIX);
    let mut found = Vec::new();
    for entry in std::fs::read_dir(plugin_dir)? {
        let path = entry?.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if file_name.starts_with(&prefix) && file_name.ends_with(std::env::consts::DLL_SUFFIX) {
            found.push(path);
        }
    }
    found.sort();
    Ok(found
        .into_iter()
        .map(|path| {
            let loaded = open_cached(&path);
            (path, loaded)
        })
        .collect())
}

/// One configured provider: a plugin instance with its config.
pub struct Provider {
    /// The provider's name in config (a bounded, operator-chosen label).
    pub name: String,
    pub config: ProviderConfig,
    pub plugin: Arc<LoadedPlugin>,
    /// Initialised with `InitContext::durable` (`durability: power_loss`): its calls may
    /// fsync, so they never run on an async worker.
    pub durable: bool,
    instance: RawInstance,
}

impl Provider {
    /// Stores one upload upstream. Blocking: call from a blocking thread.
    pub fn put(&self, request: &PutRequest) -> Result<PutResult, PluginError> {
        self.call(Call::Put, &serde_json::to_vec(request).unwrap_or_default())
            .and_then(|bytes| decode_put(&bytes))
    }

    /// Stores one upload upstream while it arrives, reading it from `body`. Blocking (the
    /// body's reads wait for the client). Only for plugins that stream.
    pub fn put_stream(
        &self,
        request: &StreamRequest,
        body: &mut dyn BodySource,
    ) -> Result<PutResult, PluginError> {
        let (status, bytes) = self
            .instance
            .put_stream(&serde_json::to_vec(request).unwrap_or_default(), body);
        answer(status, bytes).and_then(|bytes| decode_put(&bytes))
    }

    /// Deletes one upload upstream. Blocking.
    pub fn delete(&self, request: &DeleteRequest) -> Result<(), PluginError> {
        self.call(Call::Delete, &serde_json::to_vec(request).unwrap_or_default())
            .map(|_| ())
    }

    /// Readiness of the provider. Blocking (but plugins keep it cheap).
    pub fn health(&self) -> Result<(), PluginError> {
        self.call(Call::Health, b"null").map(|_| ())
    }

    fn call(&self, call: Call, request: &[u8]) -> Result<Vec<u8>, PluginError> {
        let (status, bytes) = self.instance.call(call, request);
        answer(status, bytes)
    }
}

/// The longest message of a plugin's error the host keeps (it reaches clients, records
/// and log lines).
const MAX_ERROR_MESSAGE_CHARS: usize = 1024;

/// The longest `Retry-After` a plugin's error is taken at (a day).
const MAX_RETRY_AFTER_SECS: u64 = 24 * 3600;

/// A call's status and bytes: the result bytes, or the plugin's error, taken as far as the
/// host can vouch for it: `busy` is the host's own kind (a plugin's is `internal`), a
/// `Retry-After` is at most a day, and the message is cut to [`MAX_ERROR_MESSAGE_CHARS`]
/// with control and bidirectional characters replaced, since it reaches the client, the
/// record and the log line (a panic message or an I/O error is no upstream reason the
/// shared client already cleaned).
fn answer(status: i32, bytes: Vec<u8>) -> Result<Vec<u8>, PluginError> {
    if RawInstance::ok(status) {
        return Ok(bytes);
    }
    let mut error = serde_json::from_slice::<PluginError>(&bytes).unwrap_or_else(|_| {
        PluginError::new(
            ErrorKind::Internal,
            format!("plugin returned status {status} with an unreadable error"),
        )
    });
    if status == STATUS_PANIC {
        error.kind = ErrorKind::Panic;
    }
    if error.kind == ErrorKind::Busy {
        error.kind = ErrorKind::Internal;
    }
    error.retry_after_secs = error.retry_after_secs.map(|secs| secs.min(MAX_RETRY_AFTER_SECS));
    error.message = error
        .message
        .chars()
        .take(MAX_ERROR_MESSAGE_CHARS)
        .map(|c| if is_unseen_control(c) { ' ' } else { c })
        .collect();
    Err(error)
}

/// What the host takes of a plugin's [`PutResult`]: not its `raw` answer (skipped unread,
/// never parsed), a remote id that is a plain id (it is stored, printed by the operator
/// commands and put in the client's answer), and a URL only when it is one: visible ASCII,
/// and an `http`, `https` or `file` URL or a reference without a scheme (Kore XO answers
/// `AppFileSystem/<id>.<ext>`); a `javascript:` or `data:` one, say, is dropped.
#[derive(serde::Deserialize)]
struct PutAnswer {
    remote_id: String,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    consumed_file: bool,
}

/// Longest remote id and URL a plugin may hand back.
const MAX_REMOTE_ID_BYTES: usize = 256;
const MAX_URL_BYTES: usize = 2048;

fn decode_put(bytes: &[u8]) -> Result<PutResult, PluginError> {
    let answer: PutAnswer = decode(bytes)?;
    let visible = |text: &str| text.bytes().all(|byte| byte.is_ascii_graphic());
    if answer.remote_id.is_empty()
        || answer.remote_id.len() > MAX_REMOTE_ID_BYTES
        || !visible(&answer.remote_id)
    {
        return Err(PluginError::new(
            ErrorKind::Internal,
            format!(
                "plugin answered a remote id that is not visible ASCII of 1 to {MAX_REMOTE_ID_BYTES} bytes"
            ),
        ));
    }
    let url = answer.url.filter(|url| {
        let allowed = |scheme: &str| {
            ["http", "https", "file"]
                .iter()
                .any(|s| scheme.eq_ignore_ascii_case(s))
        };
        !url.is_empty() && url.len() <= MAX_URL_BYTES && visible(url) && scheme_of(url).is_none_or(allowed)
    });
    Ok(PutResult {
        remote_id: answer.remote_id,
        url,
        raw: serde_json::Value::Null,
        consumed_file: answer.consumed_file,
    })
}

/// The scheme of a URI reference (RFC 3986: a letter, then letters, digits, `+`, `-`, `.`,
/// then `:`; a `/`, `?` or `#` before the first `:` makes it relative); `None` for a
/// relative reference.
fn scheme_of(url: &str) -> Option<&str> {
    let (scheme, _) = url.split_once(':')?;
    let plain = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    plain.then_some(scheme)
}

fn decode<T: for<'de> serde::Deserialize<'de>>(bytes: &[u8]) -> Result<T, PluginError> {
    serde_json::from_slice(bytes).map_err(|error| {
        PluginError::new(
            ErrorKind::Internal,
            format!("plugin answered unreadable JSON: {error}"),
        )
    })
}

/// Instantiates every provider in `config`. Collects all problems rather than stopping at
/// the first.
pub(crate) fn instantiate(config: &Config) -> Result<BTreeMap<String, Arc<Provider>>, Vec<PluginHostError>> {
    let mut providers = BTreeMap::new();
    let mut errors = Vec::new();
    let durable = config.server.durability == Durability::PowerLoss;
    for (name, provider_config) in &config.providers {
        match instantiate_one(
            &config.server.plugin_dir,
            config.base_dir(),
            durable,
            name,
            provider_config,
        ) {
            Ok(provider) => {
                providers.insert(name.clone(), Arc::new(provider));
            }
            Err(error) => errors.push(error),
        }
    }
    if errors.is_empty() {
        Ok(providers)
    } else {
        Err(errors)
    }
}

fn instantiate_one(
    plugin_dir: &Path,
    config_dir: &Path,
    durable: bool,
    name: &str,
    config: &ProviderConfig,
) -> Result<Provider, PluginHostError> {
    let plugin = load(plugin_dir, &config.plugin)?;
    let request = InitRequest {
        settings: config.settings.0.clone(),
        context: InitContext {
            config_dir: config_dir.to_path_buf(),
            durable,
        },
    };
    let request = serde_json::to_vec(&request).unwrap_or_default();
    let instance = plugin.init(&request).map_err(|bytes| {
        let message = serde_json::from_slice::<PluginError>(&bytes)
            .map(|error| error.message)
            .unwrap_or_else(|_| "init failed".to_owned());
        PluginHostError::Init {
            provider: name.to_owned(),
            plugin: config.plugin.clone(),
            message,
        }
    })?;
    Ok(Provider {
        name: name.to_owned(),
        config: config.clone(),
        plugin,
        durable,
        instance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(id: &str, url: &str) -> Result<PutResult, PluginError> {
        let answer = serde_json::json!({"remote_id": id, "url": url, "raw": {"big": [0, 0, 0]}});
        decode_put(&serde_json::to_vec(&answer).unwrap())
    }

    #[test]
    fn a_put_result_keeps_plain_ids_and_urls_only() {
        let kept = put("f-1", "https://cdn.example/f-1").unwrap();
        assert_eq!(
            (kept.remote_id.as_str(), kept.url.as_deref()),
            ("f-1", Some("https://cdn.example/f-1"))
        );
        assert_eq!(kept.raw, serde_json::Value::Null);
        for url in [
            "AppFileSystem/f-1.txt",
            "file:///srv/files/f-1",
            "/files/f-1?x=a:b",
            "HTTP://h/x",
        ] {
            assert_eq!(put("f-1", url).unwrap().url.as_deref(), Some(url), "{url}");
        }
        for url in [
            "javascript:alert(1)",
            "data:text/html,x",
            "https://h/\u{202e}x",
            "a b",
            "",
        ] {
            assert_eq!(put("f-1", url).unwrap().url, None, "{url}");
        }
        assert_eq!(
            put("f-1", &format!("https://h/{}", "a".repeat(3000)))
                .unwrap()
                .url,
            None
        );
        for id in ["", "a/../b\u{1b}[2J", "a b", "\u{e9}", &"x".repeat(257)] {
            assert_eq!(
                put(id, "https://h/x").unwrap_err().kind,
                ErrorKind::Internal,
                "{id}"
            );
        }
    }

    #[test]
    fn a_plugins_error_is_taken_as_far_as_the_host_can_vouch_for_it() {
        let failed = |error: serde_json::Value| answer(1, serde_json::to_vec(&error).unwrap()).unwrap_err();
        // `busy` is the host's kind; a day is the longest wait taken.
        let error = failed(serde_json::json!({
            "kind": "busy", "message": "x", "retry_after_secs": u64::MAX
        }));
        assert_eq!(
            (error.kind, error.retry_after_secs),
            (ErrorKind::Internal, Some(86_400))
        );
        // A message that would forge a log line or reorder one, and one without end.
        let error = failed(serde_json::json!({
            "kind": "rejected", "message": "no\nlevel=INFO forged \u{202e}txt.exe"
        }));
        assert_eq!(error.message, "no level=INFO forged  txt.exe");
        let error = failed(serde_json::json!({"kind": "internal", "message": "é".repeat(5000)}));
        assert_eq!(error.message.chars().count(), MAX_ERROR_MESSAGE_CHARS);
        // What is fine stays as it is.
        let error = failed(serde_json::json!({
            "kind": "unavailable", "message": "upstream 503: busy", "retry_after_secs": 30, "status": 503
        }));
        assert_eq!(
            (
                error.kind,
                error.message.as_str(),
                error.retry_after_secs,
                error.status
            ),
            (ErrorKind::Unavailable, "upstream 503: busy", Some(30), Some(503))
        );
    }
}
