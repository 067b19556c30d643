//! The local-disk provider: stores each upload under `root`, named by its upload id.
//!
//! What flows through here: a spooled upload (path + metadata) from the host. The file is
//! moved into `<root>/<upload id>` (a rename on the same filesystem, a streamed copy
//! otherwise); the client's filename never becomes a path. The URL returned is
//! `<public_base_url>/<upload id>` when configured, else none: the file's path on this
//! server is nobody else's business (a dialect whose answer needs a URL then names the upload
//! `upgate://uploads/<id>`; `public_base_url: file:///srv/files` gives file URLs to those who
//! want them). Delete removes the file. Settings: `root` (required), `public_base_url`
//! (optional).
#![deny(unsafe_code)]

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;
use upgate_plugin_api::{
    DeleteRequest, ErrorKind, InitContext, PluginError, Provider, PutRequest, PutResult,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    root: PathBuf,
    #[serde(default)]
    public_base_url: Option<String>,
}

pub struct LocalDisk {
    root: PathBuf,
    public_base_url: Option<String>,
    /// fsync what `put` writes or renames (`durability: power_loss`).
    durable: bool,
}

fn internal(error: impl std::fmt::Display) -> PluginError {
    PluginError::new(ErrorKind::Internal, error.to_string())
}

/// Ids come from upgate, but a plugin checks what becomes a path anyway.
fn checked_id(id: &str) -> Result<&str, PluginError> {
    let safe = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if safe {
        Ok(id)
    } else {
        Err(PluginError::new(ErrorKind::Rejected, "invalid upload id"))
    }
}

impl Provider for LocalDisk {
    /// A rename into `root` (a copy only across file systems): safe to call inline for
    /// small files.
    const FLAGS: u32 = upgate_plugin_api::FLAG_LOCAL_IO;

    fn init(context: &InitContext, settings: Value) -> Result<Self, PluginError> {
        let settings: Settings = serde_json::from_value(settings).map_err(|error| {
            PluginError::new(ErrorKind::Config, format!("local provider settings: {error}"))
        })?;
        let root = context.resolve(&settings.root);
        std::fs::create_dir_all(&root).map_err(|error| {
            PluginError::new(
                ErrorKind::Config,
                format!("cannot create root {}: {error}", root.display()),
            )
        })?;
        let root = root.canonicalize().map_err(internal)?;
        let public_base_url = settings
            .public_base_url
            .map(|url| url.trim_end_matches('/').to_owned());
        Ok(Self {
            root,
            public_base_url,
            durable: context.durable,
        })
    }

    fn put(&self, request: PutRequest) -> Result<PutResult, PluginError> {
        let id = checked_id(&request.upload_id)?;
        let target = self.root.join(id);
        // The host no longer needs the spooled file: move it into place (one rename), or,
        // across file systems, copy it and make the copy appear atomically.
        let moved = match std::fs::rename(&request.path, &target) {
            Ok(()) => true,
            // A put again after one that moved the file before its host could record it (the
            // daemon killed in between; the outbox delivers again): the spooled file is gone
            // and its bytes are in place. The same put succeeds again (idempotent per id).
            Err(error)
                if error.kind() == std::io::ErrorKind::NotFound
                    && std::fs::metadata(&target).is_ok_and(|meta| meta.len() == request.size) =>
            {
                true
            }
            Err(_) => false,
        };
        if !moved {
            let partial = self.root.join(format!(".{id}.part"));
            let copied = std::fs::copy(&request.path, &partial)
                .and_then(|_| match self.durable {
                    true => std::fs::File::open(&partial).and_then(|file| file.sync_all()),
                    false => Ok(()),
                })
                .and_then(|()| std::fs::rename(&partial, &target));
            if let Err(error) = copied {
                // A full disk, say: the partial copy does not stay in the root.
                let _ = std::fs::remove_file(&partial);
                return Err(internal(error));
            }
        }
        if self.durable {
            // The file's data was made durable in the spool; its new name must be too.
            std::fs::File::open(&self.root)
                .and_then(|dir| dir.sync_all())
                .map_err(internal)?;
        }
        Ok(PutResult {
            remote_id: id.to_owned(),
            url: self.public_base_url.as_ref().map(|base| format!("{base}/{id}")),
            raw: Value::Null,
            consumed_file: moved,
        })
    }

    fn delete(&self, request: DeleteRequest) -> Result<(), PluginError> {
        let id = checked_id(&request.remote_id)?;
        match std::fs::remove_file(self.root.join(id)) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Err(PluginError::new(ErrorKind::NotFound, "no such file"))
            }
            Err(error) => Err(internal(error)),
        }
    }

    fn health(&self) -> Result<(), PluginError> {
        if self.root.is_dir() {
            Ok(())
        } else {
            Err(internal(format!("{} is not a directory", self.root.display())))
        }
    }
}

upgate_plugin_api::export_provider!(LocalDisk, "local");

#[cfg(test)]
mod tests {
    use super::*;

    fn request(dir: &std::path::Path, id: &str) -> PutRequest {
        let path = dir.join("spooled");
        std::fs::write(&path, b"bytes").unwrap();
        PutRequest {
            upload_id: id.into(),
            filename: "../../evil.txt".into(),
            extension: "txt".into(),
            mime_type: "text/plain".into(),
            size: 5,
            sha256: String::new(),
            path: path.display().to_string(),
            tenant: "t".into(),
            dialect: "dify".into(),
            metadata: Default::default(),
            deadline_ms: None,
        }
    }

    #[test]
    fn stores_by_id_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let provider = LocalDisk::init(
            &InitContext::default(),
            serde_json::json!({ "root": root, "public_base_url": "https://files.example/" }),
        )
        .unwrap();
        let first = request(dir.path(), "abc-123");
        let result = provider.put(first.clone()).unwrap();
        assert_eq!(result.url.as_deref(), Some("https://files.example/abc-123"));
        assert_eq!(std::fs::read(root.join("abc-123")).unwrap(), b"bytes");
        // The same put again (its host died before recording the first): done already.
        assert!(!std::path::Path::new(&first.path).exists());
        let again = provider.put(first.clone()).unwrap();
        assert_eq!(again.remote_id, "abc-123");
        // Not with another size: the bytes in place are not this upload's.
        let other = PutRequest { size: 6, ..first };
        assert!(provider.put(other).is_err());
        assert!(!dir.path().join("evil.txt").exists());
        provider
            .delete(DeleteRequest {
                upload_id: "abc-123".into(),
                remote_id: "abc-123".into(),
                metadata: Default::default(),
                dialect: "dify".into(),
            })
            .unwrap();
        let again = provider.delete(DeleteRequest {
            upload_id: "x".into(),
            remote_id: "abc-123".into(),
            metadata: Default::default(),
            dialect: "dify".into(),
        });
        assert_eq!(again.unwrap_err().kind, ErrorKind::NotFound);
        let bad = provider.put(request(dir.path(), "../x"));
        assert_eq!(bad.unwrap_err().kind, ErrorKind::Rejected);
    }

    #[test]
    fn a_relative_root_is_under_the_config_directory_and_durable_mode_stores_too() {
        let dir = tempfile::tempdir().unwrap();
        let context = InitContext {
            config_dir: dir.path().to_path_buf(),
            durable: true,
        };
        let provider = LocalDisk::init(&context, serde_json::json!({ "root": "files" })).unwrap();
        assert!(provider.durable);
        provider.put(request(dir.path(), "id-1")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("files/id-1")).unwrap(), b"bytes");
    }

    #[test]
    fn unknown_settings_are_refused() {
        let error = LocalDisk::init(
            &InitContext::default(),
            serde_json::json!({ "root": "/tmp/x", "colour": 1 }),
        )
        .err()
        .unwrap();
        assert_eq!(error.kind, ErrorKind::Config);
        assert!(error.message.contains("colour"));
    }
}
