//! The example provider: the smallest complete plugin, the one to copy when writing a new
//! provider (see README, "Writing a plugin").
//!
//! What flows through here: a spooled upload, read in 64 KiB pieces (never whole) to count
//! its bytes and hash it; the answer's remote id is `example-<first 16 hex of sha256>`.
//! Settings: `panic_on` (optional filename): a `put` of that filename panics, which the ABI's
//! trampolines turn into a provider error (the tests use it to prove a panicking plugin does
//! not take the daemon down); `fail_with` (optional: `rejected`, `unavailable`, `timeout`)
//! makes every `put` fail with that kind.
#![deny(unsafe_code)]

use std::io::Read;

use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use upgate_plugin_api::{
    DeleteRequest, ErrorKind, InitContext, PluginError, Provider, PutRequest, PutResult,
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

impl Provider for Example {
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
        if self.settings.panic_on.as_deref() == Some(request.filename.as_str()) {
            panic!("example plugin told to panic on {}", request.filename);
        }
        if let Some(kind) = self.settings.fail_with {
            return Err(PluginError::new(kind, "example plugin told to fail"));
        }
        let mut file = std::fs::File::open(&request.path)
            .map_err(|error| PluginError::new(ErrorKind::Internal, error.to_string()))?;
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 64 * 1024];
        let mut size = 0u64;
        loop {
            let read = file
                .read(&mut buffer)
                .map_err(|error| PluginError::new(ErrorKind::Internal, error.to_string()))?;
            if read == 0 {
                break;
            }
            size += read as u64;
            hasher.update(&buffer[..read]);
        }
        let sha256 = hex::encode(hasher.finalize());
        Ok(PutResult {
            remote_id: format!("example-{}", &sha256[..16]),
            url: None,
            raw: json!({ "size": size, "sha256": sha256 }),
            consumed_file: false,
        })
    }

    fn delete(&self, _request: DeleteRequest) -> Result<(), PluginError> {
        Ok(())
    }
}

upgate_plugin_api::export_provider!(Example, "example");
