//! Operator commands: what `upgate uploads ...` does from outside the running daemon.
//!
//! What flows through here: an upload id from the command line, validated against every
//! dialect's id format before any lookup, and the same upload flow the daemon runs
//! (opened on the same store and spool: SQLite's WAL lets both share them).

use std::path::Path;

use super::{ServeError, load, open_gateway};
use crate::error::ApiError;
use crate::store::UploadRecord;
use crate::vocab::DialectName;

/// `upgate uploads delete`: deletes one upload of any tenant, as the Kore XO `DELETE` does
/// (the provider's copy, the spooled bytes, the record's state).
pub fn delete_upload(config_path: &Path, id: &str) -> Result<UploadRecord, ServeError> {
    if !DialectName::ALL
        .iter()
        .any(|dialect| dialect.is_valid_upload_id(id))
    {
        return Err(ServeError::Refused(
            "not an upload id (a uuid, 24 hex digits or f-<uuid>)".into(),
        ));
    }
    let (config, providers) = load(config_path)?;
    actix_web::rt::System::new().block_on(async move {
        let gateway = open_gateway(config, providers)?;
        gateway.delete_as_operator(id).await.map_err(|error| match error {
            ApiError::NotFound => ServeError::Refused(format!("no upload {id} (or it was deleted already)")),
            other => ServeError::Refused(format!("cannot delete {id}: {other}")),
        })
    })
}
