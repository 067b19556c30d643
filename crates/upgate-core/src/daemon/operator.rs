//! Operator commands: what `upgate uploads ...` and `upgate sessions ...` do from outside
//! the running daemon, safely while it runs.
//!
//! What flows through here: filters and upload ids from the command line (ids validated
//! against every dialect's id format before any lookup), and the store and spool the daemon
//! uses (SQLite's WAL lets both share them), as the daemon left it: a store of another
//! schema version is refused, never migrated under a running daemon. Listings only read; `retry` puts a failed
//! upload whose bytes are still spooled back in the outbox, where the running daemon's
//! worker delivers it within a second; `delete` runs the same flow as a dialect's delete.

use std::path::Path;
use std::sync::Arc;

use super::{ServeError, load, open_gateway};
use crate::config::Config;
use crate::error::ApiError;
use crate::spool::Spool;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{SessionRecord, Store, UploadFilter, UploadRecord, UploadState};
use crate::vocab::DialectName;

fn check_id(id: &str) -> Result<(), ServeError> {
    if DialectName::ALL
        .iter()
        .any(|dialect| dialect.is_valid_upload_id(id))
    {
        Ok(())
    } else {
        Err(ServeError::Usage(
            "not an upload id (a uuid, 24 hex digits, f-<uuid> or 32 hex digits)".into(),
        ))
    }
}

/// The store and spool of a config, without loading any plugin (listings need none).
/// A config's store and spool, as the daemon opens them.
type Opened = (Config, Arc<dyn Store>, Arc<dyn Spool>);

fn open_store(config_path: &Path) -> Result<Opened, ServeError> {
    let config = Config::load(config_path).map_err(ServeError::Config)?;
    check_schema(&config)?;
    let store = block_on(super::open_store(&config))?;
    let spool = super::open_spool(&config)?;
    Ok((config, store, spool))
}

/// An operator command works on the store as the daemon left it: one of another upgate
/// version is refused rather than migrated (the running older daemon could not read it
/// any more) or misread (a newer one's). A store not created yet is created as `serve` would.
fn check_schema(config: &Config) -> Result<(), ServeError> {
    let (found, expected) = match &config.server.store {
        Some(store) => (
            block_on(PostgresStore::probe(&store.url)).map(|version| (version > 0).then_some(version))?,
            PostgresStore::SCHEMA_VERSION,
        ),
        None => (
            SqliteStore::schema_version(&config.server.data_dir)?,
            SqliteStore::SCHEMA_VERSION,
        ),
    };
    match found {
        Some(found) if found != expected => Err(ServeError::Refused(format!(
            "the store has schema version {found}, this upgate uses {expected}: run the operator \
             commands of the upgate version that serves it{}",
            if found < expected {
                " (starting this version's daemon migrates it)"
            } else {
                ""
            }
        ))),
        _ => Ok(()),
    }
}

fn block_on<T>(work: impl std::future::Future<Output = T>) -> T {
    actix_web::rt::System::new().block_on(work)
}

/// `upgate uploads list`: uploads per `filter`, newest first.
pub fn list_uploads(config_path: &Path, filter: UploadFilter) -> Result<Vec<UploadRecord>, ServeError> {
    let (_, store, _) = open_store(config_path)?;
    Ok(block_on(store.list_uploads(filter))?)
}

/// `upgate uploads show`: one upload, and where its bytes are while upgate holds them.
pub fn show_upload(config_path: &Path, id: &str) -> Result<(UploadRecord, Option<String>), ServeError> {
    check_id(id)?;
    let (_, store, spool) = open_store(config_path)?;
    let record = block_on(store.upload(id.to_owned()))?
        .ok_or_else(|| ServeError::Refused(format!("no upload {id}")))?;
    let spooled = spool.locate(id).map_err(ServeError::io(format!(
        "cannot look for the spooled bytes of {id}"
    )))?;
    Ok((record, spooled))
}

/// `upgate uploads retry`: a failed delivery whose bytes are still spooled goes back in the
/// outbox, due now.
pub fn retry_upload(config_path: &Path, id: &str) -> Result<UploadRecord, ServeError> {
    let (record, spooled) = show_upload(config_path, id)?;
    let (config, store, _) = open_store(config_path)?;
    if !config.providers.contains_key(&record.provider) {
        return Err(ServeError::Refused(format!(
            "{id} was accepted for provider {}, which the config no longer has: add it back, then retry",
            record.provider
        )));
    }
    if record.state != UploadState::Failed {
        return Err(ServeError::Refused(format!(
            "{id} is {}, not failed: only a failed delivery is retried",
            record.state.as_str()
        )));
    }
    if spooled.is_none() {
        return Err(ServeError::Refused(format!(
            "the bytes of {id} are not kept (a sync delivery's client was told it failed and sends it again)"
        )));
    }
    if !block_on(store.retry_upload(id.to_owned()))? {
        return Err(ServeError::Refused(format!("{id} changed meanwhile; look again")));
    }
    Ok(block_on(store.upload(id.to_owned()))?.unwrap_or(record))
}

/// `upgate sessions list`: chunked sessions and tus uploads in progress.
pub fn list_sessions(config_path: &Path) -> Result<Vec<SessionRecord>, ServeError> {
    let (_, store, _) = open_store(config_path)?;
    Ok(block_on(store.list_sessions())?)
}

/// `upgate uploads delete`: deletes one upload of any tenant, as the Kore XO `DELETE` does
/// (the provider's copy, the spooled bytes, the record's state).
pub fn delete_upload(config_path: &Path, id: &str) -> Result<UploadRecord, ServeError> {
    check_id(id)?;
    let (config, providers) = load(config_path)?;
    check_schema(&config)?;
    block_on(async move {
        let gateway = open_gateway(config, providers).await?;
        gateway.delete_as_operator(id).await.map_err(|error| match error {
            ApiError::NotFound => ServeError::Refused(format!("no upload {id} (or it was deleted already)")),
            other => ServeError::Refused(format!("cannot delete {id}: {other}")),
        })
    })
}
