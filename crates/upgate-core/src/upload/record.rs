//! Recording: received files become upload records, and each is delivered or queued.
//!
//! What flows through here: the spooled files of one admitted request and the dialect's
//! metadata. The day's quota takes their bytes (or refuses them); with async delivery they
//! get durable spool names and their records (state `received`) are the outbox entries;
//! with sync delivery they are recorded `delivering` under a lease, delivered, then given
//! the state their delivery ended in, and a multi-file request that failed part-way is
//! rolled back upstream. Out come the records, or the error the client is told.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Delivery;
use crate::error::{ApiError, Throttle};
use crate::metrics;
use crate::plugins::Provider;
use crate::policy::quota_day;
use crate::spool::SpooledFile;
use crate::store::{UploadRecord, UploadState};
use crate::vocab::now_ms;

use super::admit::Admission;
use super::intake::Arrived;
use super::pass_through::PassThrough;
use super::{Gateway, Metadata, deliver, remove_quietly};
use crate::policy::Tenant;

/// What the record of an interrupted sync delivery says.
const INTERRUPTED: &str = "interrupted: the daemon stopped during the sync delivery, before the client was answered; the provider may hold a copy";

/// Whether `record` failed because the daemon died during its sync delivery (its client
/// never had an answer).
pub(crate) fn was_interrupted(record: &UploadRecord) -> bool {
    record.state == UploadState::Failed && record.last_error.as_deref() == Some(INTERRUPTED)
}

/// How long the sync delivery of `files` files may take (one after the other, each within
/// the provider's timeout, in which it retries) plus a margin for a plugin call that overruns
/// it: their records' lease.
fn sync_delivery_lease_ms(timeout: std::time::Duration, files: usize) -> i64 {
    const MARGIN_MS: i64 = 60_000;
    i64::try_from(timeout.as_millis())
        .unwrap_or(i64::MAX)
        .saturating_mul(i64::try_from(files).unwrap_or(i64::MAX))
        .saturating_add(MARGIN_MS)
}

impl Gateway {
    /// Records received files and delivers them per the tenant's provider settings.
    pub(crate) async fn accept(
        &self,
        admission: &Admission,
        files: Vec<Arrived>,
        metadata: Metadata,
    ) -> Result<Vec<UploadRecord>, ApiError> {
        // Dropping a file's pass-through on any return before its delivery aborts it.
        let (files, mut streams): (Vec<SpooledFile>, Vec<Option<PassThrough>>) = files
            .into_iter()
            .map(|arrived| (arrived.file, arrived.passing))
            .unzip();
        let dialect = admission.dialect;
        let tenant = &admission.tenant;
        let plan = &tenant.plan;
        let provider = admission.provider().cloned().ok_or_else(|| {
            tracing::error!(tenant = %tenant.name, "the tenant's provider is not loaded");
            ApiError::Internal
        })?;
        let (day, retry_after_secs) = quota_day(now_ms());
        if plan.has_quota() {
            let total: u64 = files.iter().map(|file| file.size).sum();
            let added = self
                .limiter
                .try_add_usage(
                    tenant.name.clone(),
                    day,
                    (total, files.len() as u64),
                    plan.quota_limits(),
                )
                .await?;
            if !added {
                return Err(ApiError::Throttled {
                    retry_after_secs,
                    why: Throttle::Quota,
                });
            }
        }
        let now = now_ms();
        let mut records: Vec<UploadRecord> = files
            .iter()
            .map(|file| UploadRecord {
                id: file.upload_id.clone(),
                tenant: tenant.name.clone(),
                dialect,
                filename: file.filename.clone(),
                extension: file.extension.clone(),
                mime: file.mime.clone(),
                size: file.size,
                sha256: file.sha256.clone(),
                state: UploadState::Received,
                provider: provider.name.clone(),
                remote_id: None,
                remote_url: None,
                metadata: metadata.clone(),
                attempts: 0,
                last_error: None,
                created_at_ms: now,
                updated_at_ms: now,
            })
            .collect();
        for record in &records {
            metrics::upload_received(dialect, &provider.name, record.size);
        }
        if provider.config.delivery == Delivery::Async {
            // The files get their durable names and the records (state `received`) are the
            // outbox entries; the client is answered once both are done.
            let spool = self.spool.clone();
            let persisted = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<SpooledFile>> {
                let mut files = files;
                for file in &mut files {
                    file.persist(spool.as_ref())?;
                }
                Ok(files)
            })
            .await?;
            let files = match persisted {
                Ok(files) => files,
                Err(error) => {
                    // Not acknowledged: what was put before the failure goes (or the sweep of
                    // orphans takes it), the quota comes back.
                    for record in &records {
                        deliver::remove_persisted(self, &record.id).await;
                    }
                    self.refund(tenant, plan.has_quota(), day, &records).await;
                    return Err(error.into());
                }
            };
            if let Err(error) = self.store.insert_uploads(records.clone(), now).await {
                drop(files);
                for record in &records {
                    deliver::remove_persisted(self, &record.id).await;
                }
                self.refund(tenant, plan.has_quota(), day, &records).await;
                return Err(error.into());
            }
            files.into_iter().for_each(|file| drop(file.keep()));
            self.outbox_wake.notify_one();
            return Ok(records);
        }
        // Sync: the records are written first, `delivering` under a lease as long as the
        // delivery may take, so that a daemon that dies during the provider call leaves a
        // record of it (failed when the lease ends, see `fail_interrupted_deliveries`), never
        // a copy upstream that no record explains. Then each is delivered, and the outcomes
        // are written over them.
        for record in &mut records {
            record.state = UploadState::Delivering;
        }
        let lease_end = now.saturating_add(sync_delivery_lease_ms(provider.config.timeout.0, records.len()));
        if let Err(error) = self.store.insert_uploads(records.clone(), lease_end).await {
            // Nothing was delivered: the spooled files go with `files`, the quota comes back.
            self.refund(tenant, plan.has_quota(), day, &records).await;
            return Err(error.into());
        }
        let paths: Vec<PathBuf> = files.into_iter().map(SpooledFile::keep).collect();
        let mut failure = None;
        for (index, (record, path)) in records.iter_mut().zip(&paths).enumerate() {
            let (done, later) = streams.split_at_mut(index + 1);
            let streaming = done[index].take();
            if failure.is_some() {
                // The client is told the request failed: the files after it fail too.
                record.state = UploadState::Failed;
                record.last_error = Some("an earlier file of the same request failed".into());
                remove_quietly(path);
                continue;
            }
            match deliver::deliver_now(self, &provider, record, path, streaming, later).await {
                Ok(delivered) => {
                    record.state = UploadState::Forwarded;
                    record.attempts = delivered.attempts;
                    record.remote_id = Some(delivered.result.remote_id);
                    record.remote_url = delivered.result.url;
                }
                Err(not_delivered) => {
                    record.state = UploadState::Failed;
                    record.attempts = not_delivered.attempts;
                    record.last_error = Some(not_delivered.reason);
                    failure = Some(not_delivered.error);
                }
            }
        }
        if failure.is_some() {
            self.roll_back_delivered(&provider, &mut records).await;
            // The client was told the request failed and will send it again: what was not
            // kept does not count against the day's quota.
            let not_kept: Vec<UploadRecord> = records
                .iter()
                .filter(|record| record.state != UploadState::Forwarded)
                .cloned()
                .collect();
            self.refund(tenant, plan.has_quota(), day, &not_kept).await;
        }
        let recorded = match self.store.record_outcomes(records.clone()).await {
            Ok(changed) if changed == records.len() => Ok(()),
            // The lease ended first (a delivery that overran it, or a clock ahead on the node
            // that swept): the records already say `interrupted`, and their quota is back.
            Ok(_) => Err(ApiError::UpstreamTimeout),
            Err(error) => Err(error.into()),
        };
        if let Err(error) = recorded {
            // Delivered but the outcome not recorded: the client, told the request failed,
            // sends it again, so nothing may stay upstream. Records still `delivering` fail
            // when their lease ends, which gives back their quota.
            self.roll_back_delivered(&provider, &mut records).await;
            return Err(error);
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(records),
        }
    }

    /// Gives back the quota `records` took, when the plan has one.
    async fn refund(&self, tenant: &Tenant, has_quota: bool, day: i64, records: &[UploadRecord]) {
        if !has_quota || records.is_empty() {
            return;
        }
        let (bytes, uploads) = records.iter().fold((0, 0), |(bytes, uploads), record| {
            (bytes + record.size, uploads + 1)
        });
        if let Err(error) = self
            .limiter
            .refund_usage(tenant.name.clone(), day, (bytes, uploads))
            .await
        {
            tracing::error!(%error, tenant = %tenant.name, "cannot give back quota of uploads not kept");
        }
    }

    /// Fails the sync deliveries whose lease has ended (their daemon died during the provider
    /// call; the client was never answered) and gives back their quota. At start, and then
    /// with the housekeeping sweep (with a shared store, another node's dead deliveries).
    pub(crate) async fn fail_interrupted_deliveries(&self) {
        let failed = match self
            .store
            .fail_interrupted_deliveries(now_ms(), INTERRUPTED.to_owned())
            .await
        {
            Ok(failed) => failed,
            Err(error) => {
                tracing::warn!(%error, "cannot sweep interrupted deliveries");
                return;
            }
        };
        let policy = self.policy();
        for record in &failed {
            tracing::warn!(upload_id = %record.id, provider = %record.provider,
                "a sync delivery was interrupted (the daemon stopped during it); the upload is failed");
            metrics::upload_outcome(record.dialect, &record.provider, "failed");
            if let Some(tenant) = policy.tenant(&record.tenant) {
                let (day, _) = quota_day(record.created_at_ms);
                self.refund(tenant, tenant.plan.has_quota(), day, std::slice::from_ref(record))
                    .await;
            }
        }
    }

    /// A multi-file request failed after some of its files were delivered: the client is told
    /// the whole request failed, so those copies are deleted upstream too. A provider that
    /// cannot delete keeps them; their records stay `forwarded` and say why.
    async fn roll_back_delivered(&self, provider: &Arc<Provider>, records: &mut [UploadRecord]) {
        for record in records.iter_mut() {
            let (UploadState::Forwarded, Some(remote_id)) = (record.state, record.remote_id.clone()) else {
                continue;
            };
            match deliver::delete_upstream(self, provider, record, remote_id).await {
                Ok(()) => {
                    record.state = UploadState::Deleted;
                    record.last_error = Some("rolled back: another file of the same request failed".into());
                }
                Err(error) => {
                    tracing::warn!(upload_id = %record.id, provider = %provider.name, %error,
                        "cannot roll back a delivered file of a failed request; it stays upstream");
                    record.last_error =
                        Some("kept upstream: another file of the same request failed, and the provider cannot delete".into());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_sync_delivery_lease_covers_every_file_one_after_the_other() {
        let timeout = Duration::from_secs(30);
        assert_eq!(super::sync_delivery_lease_ms(timeout, 1), 90_000);
        assert_eq!(super::sync_delivery_lease_ms(timeout, 4), 180_000);
        assert_eq!(super::sync_delivery_lease_ms(Duration::MAX, 10), i64::MAX);
    }
}
