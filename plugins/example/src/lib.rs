//! The example provider: the smallest complete plugin, the one to copy when writing a new
//! provider (see README, "Writing a plugin").
//!
//! What flows through here: an upload, read in 64 KiB pieces (never whole) to count its bytes
//! and hash it: the spooled file (`put`), or, as it declares [`FLAG_STREAMING`], the body while
//! it arrives (`put_stream`: the same loop over the host's [`Body`]); the answer's remote id is
//! `example-<first 16 hex of sha256>`.
//! Settings: `panic_on` (optional filename): a `put` of that filename panics (a `put_stream`
//! after its first bytes), which the ABI's trampolines turn into a provider error (the tests
//! use it to prove a panicking plugin does not take the daemon down); `fail_with` (optional:
//! `rejected`, `unavailable`, `timeout`) makes every call fail with that kind.
#![deny(unsafe_code)]

use std::io::Read;

use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use upgate_plugin_api::{
    Body, DeleteRequest, ErrorKind, FLAG_STREAMING, InitContext, PluginError, Provider, PutRequest,
    PutResult, StreamRequest,
};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    panic_on: Option<String>,
    #[serde(default)]
    fail_with: Option<ErrorKind>,
}

pub struct Example {
    settings: Settings,
}

impl Example {
    /// What the settings say about an upload of `filename`: panic, fail, or go on.
    fn check(&self, filename: &str) -> Result<(), PluginError> {
        if self.settings.panic_on.as_deref() == Some(filename) {
            panic!("example plugin told to panic on {filename}");
        }
        match self.settings.fail_with {
            Some(kind) => Err(PluginError::new(kind, "example plugin told to fail")),
            None => Ok(()),
        }
    }
}

/// Counts and hashes `content` to its end, calling `after_piece` after each piece read.
fn hash(mut content: impl Read, after_piece: impl Fn()) -> Result<PutResult, PluginError> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let read = content
            .read(&mut buffer)
            .map_err(|error| PluginError::new(ErrorKind::Internal, error.to_string()))?;
        if read == 0 {
            break;
        }
        size += read as u64;
        hasher.update(&buffer[..read]);
        after_piece();
    }
    let sha256 = hex::encode(hasher.finalize());
    Ok(PutResult {
        remote_id: format!("example-{}", &sha256[..16]),
        url: None,
        raw: json!({ "size": size, "sha256": sha256 }),
        consumed_file: false,
    })
}

impl Provider for Example {
    const FLAGS: u32 = FLAG_STREAMING;

    fn init(_context: &InitContext, settings: Value) -> Result<Self, PluginError> {
        let settings = if settings.is_null() {
            Settings::default()
        } else {
            serde_json::from_value(settings)
                .map_err(|error| PluginError::new(ErrorKind::Config, format!("example settings: {error}")))?
        };
        Ok(Self { settings })
    }

    fn put(&self, request: PutRequest) -> Result<PutResult, PluginError> {
        self.check(&request.filename)?;
        let file = std::fs::File::open(&request.path)
            .map_err(|error| PluginError::new(ErrorKind::Internal, error.to_string()))?;
        hash(file, || {})
    }

    fn put_stream(&self, request: StreamRequest, body: &mut Body<'_>) -> Result<PutResult, PluginError> {
        let panic_on = self.settings.panic_on.as_deref() == Some(request.filename.as_str());
        if !panic_on {
            self.check(&request.filename)?;
        }
        // A read error is the host's abort: nothing was stored, so there is nothing to undo.
        hash(body, || {
            if panic_on {
                panic!("example plugin told to panic on {}", request.filename);
            }
        })
    }

    fn delete(&self, _request: DeleteRequest) -> Result<(), PluginError> {
        Ok(())
    }
}

upgate_plugin_api::export_provider!(Example, "example");
