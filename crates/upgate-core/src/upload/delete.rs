//! Deletes: an upload's upstream copy, its spooled bytes and its record's state.
//!
//! What flows through here: an upload id of the admitted tenant (a dialect's `DELETE`) or
//! of any tenant (the operator's `upgate uploads delete`); the provider that stored it, as
//! configured now, deletes its copy; then the spooled bytes go and the record says
//! `deleted`. Deletes of one upload are serialized: exactly one succeeds.

use crate::error::ApiError;
use crate::metrics;
use crate::policy::Policy;
use crate::store::{UploadRecord, UploadState};

use super::admit::Admission;
use super::hold::lock_session;
use super::{Gateway, deliver};

impl Gateway {
    /// Deletes an upload of the admitted tenant: local bytes, upstream copy, record state.
    pub(crate) async fn delete(&self, admission: &Admission, id: &str) -> Result<UploadRecord, ApiError> {
        let record = self
            .store
            .upload_of(admission.tenant.name.clone(), id.to_owned())
            .await?;
        self.delete_record(&admission.policy, record).await
    }

    /// Deletes any tenant's upload, for the operator (`upgate uploads delete`).
    pub(crate) async fn delete_as_operator(&self, id: &str) -> Result<UploadRecord, ApiError> {
        let record = self.store.upload(id.to_owned()).await?;
        self.delete_record(&self.policy(), record).await
    }

    /// What a delete does: the upstream copy (through the provider that stored it, as
    /// configured now), the spooled bytes, then the record's state.
    async fn delete_record(
        &self,
        policy: &Policy,
        record: Option<UploadRecord>,
    ) -> Result<UploadRecord, ApiError> {
        let record = record
            .filter(|record| record.state != UploadState::Deleted)
            .ok_or(ApiError::NotFound)?;
        // One delete at a time per upload: the others, once they get the lock, find it
        // deleted and answer 404, and the upstream copy is deleted once.
        let _lock = lock_session(&record.id).await;
        let record = self
            .store
            .upload(record.id.clone())
            .await?
            .filter(|current| current.state != UploadState::Deleted)
            .ok_or(ApiError::NotFound)?;
        if let Some(remote_id) = record.remote_id.clone() {
            // A provider removed from the config since: its copy cannot be reached (502,
            // logged), and the record stays as it is for when it comes back.
            let provider = policy.providers.get(&record.provider).cloned().ok_or_else(|| {
                tracing::error!(upload_id = %record.id, provider = %record.provider,
                    "cannot delete an upload whose provider is no longer configured");
                ApiError::UpstreamFailed(format!("provider {} is not configured", record.provider))
            })?;
            deliver::delete_upstream(self, &provider, &record, remote_id).await?;
        }
        deliver::remove_persisted(self, &record.id).await;
        if !self.store.mark_deleted(record.id.clone()).await? {
            return Err(ApiError::NotFound);
        }
        metrics::upload_outcome(record.dialect, &record.provider, "deleted");
        Ok(record)
    }
}
