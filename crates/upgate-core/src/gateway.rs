//! The gateway: the one upload flow every dialect shares.
//!
//! What flows through here: a dialect's request, in order through admission (key, dialect
//! grant, rate and concurrency limits, disk floor, quota room), intake (multipart to spool),
//! acceptance (quota accounting, the SQLite record in state `received`) and delivery (sync:
//! the provider plugin now, with retries; async: the outbox). Out come the stored
//! [`UploadRecord`]s for the dialect to render, or an [`ApiError`]. The current [`Policy`]
//! snapshot is swapped atomically on reload; a request keeps the snapshot it was admitted
//! with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use actix_web::web::Payload;
use actix_web::{HttpMessage, HttpRequest};
use tokio::sync::{Notify, Semaphore};

use crate::config::Delivery;
use crate::dialects::{Dialect, DialectName};
use crate::error::{ApiError, Throttle};
use crate::forward;
use crate::intake::{FormSpec, IntakeLimits, Received, Spool, SpooledFile, receive_multipart};
use crate::metrics;
use crate::plugins::Provider;
use crate::policy::{Admission, Policy, quota_day};
use crate::store::{Store, StoreError, UploadRecord, UploadState, now_ms};

/// Metadata a dialect passes along with its files (string values).
pub type Metadata = serde_json::Map<String, serde_json::Value>;

/// Shared state of the running daemon.
pub struct Gateway {
    policy: RwLock<Arc<Policy>>,
    pub store: Store,
    pub spool: Spool,
    pub data_dir: PathBuf,
    /// Plugin calls in flight (each holds a blocking thread).
    pub forward_slots: Arc<Semaphore>,
    /// Wakes the outbox worker when an async upload is accepted.
    pub outbox_wake: Notify,
}

impl Gateway {
    pub fn new(policy: Policy, store: Store, spool: Spool) -> Self {
        let data_dir = policy.config.server.data_dir.clone();
        let slots = policy.config.server.forward_concurrency.max(1);
        Self {
            policy: RwLock::new(Arc::new(policy)),
            store,
            spool,
            data_dir,
            forward_slots: Arc::new(Semaphore::new(slots)),
            outbox_wake: Notify::new(),
        }
    }

    /// The current policy snapshot.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Swaps in a new policy; requests in flight keep the old one.
    pub fn replace_policy(&self, policy: Policy) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// Authenticates and applies the limits that do not need the body.
    pub async fn admit(&self, dialect: &dyn Dialect, request: &HttpRequest) -> Result<Admission, ApiError> {
        let key = dialect.credentials(request)?;
        let policy = self.policy();
        let admission = policy.admit(dialect.name(), &key).inspect_err(|_| {
            // Refused after all (a grant, a limit): the request log still names the tenant.
            if let Some(tenant) = policy.tenant_of_key(&key) {
                request
                    .extensions_mut()
                    .insert(RequestTenant(tenant.name.clone()));
            }
        })?;
        request
            .extensions_mut()
            .insert(RequestTenant(admission.tenant.name.clone()));
        if metrics::data_dir_below_floor() {
            return Err(ApiError::InsufficientStorage);
        }
        let plan = &admission.tenant.plan;
        if plan.has_quota() {
            let (day, retry_after_secs) = quota_day(now_ms());
            let (bytes, uploads) = self
                .store
                .usage(admission.tenant.name.clone(), day)
                .await
                .map_err(internal)?;
            let (byte_limit, upload_limit) = plan.quota_limits();
            if byte_limit.is_some_and(|limit| bytes >= limit)
                || upload_limit.is_some_and(|limit| uploads >= limit)
            {
                return Err(ApiError::Throttled {
                    retry_after_secs,
                    why: Throttle::Quota,
                });
            }
        }
        Ok(admission)
    }

    /// Receives a multipart body for an admitted request (files spooled, not yet recorded).
    pub async fn receive(
        &self,
        admission: &Admission,
        dialect: DialectName,
        request: &HttpRequest,
        payload: Payload,
        spec: &FormSpec,
    ) -> Result<Received, ApiError> {
        let plan = &admission.tenant.plan;
        let max_files = plan.max_files_per_request(spec.max_files);
        if let Some(length) = crate::intake::content_length(request) {
            // The whole body cannot be legitimate if it exceeds every allowed file plus room
            // for the form's framing.
            let ceiling = plan
                .max_file_size()
                .saturating_mul(max_files as u64)
                .saturating_add(1 << 20);
            if length > ceiling {
                return Err(ApiError::TooLarge {
                    limit: plan.max_file_size(),
                });
            }
        }
        let limits = IntakeLimits {
            plan,
            max_files,
            idle_timeout: admission.policy.config.server.idle_timeout.0,
        };
        let received = receive_multipart(request.headers(), payload, spec, &limits, &self.spool, &|| {
            dialect.new_upload_id()
        })
        .await?;
        if received.files.is_empty() {
            return Err(ApiError::NoFile);
        }
        Ok(received)
    }

    /// Records received files and delivers them per the tenant's provider settings.
    pub async fn accept(
        &self,
        admission: &Admission,
        dialect: DialectName,
        files: Vec<SpooledFile>,
        metadata: Metadata,
    ) -> Result<Vec<UploadRecord>, ApiError> {
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
                .store
                .try_add_usage(
                    tenant.name.clone(),
                    day,
                    total,
                    files.len() as u64,
                    plan.quota_limits(),
                )
                .await
                .map_err(internal)?;
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
                dialect: dialect.as_str().to_owned(),
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
            let files = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<SpooledFile>> {
                let mut files = files;
                for file in &mut files {
                    file.persist(&spool)?;
                }
                Ok(files)
            })
            .await
            .map_err(|_| ApiError::Internal)?
            .map_err(|error| {
                tracing::error!(%error, "cannot persist a spooled file");
                ApiError::Internal
            })?;
            self.store
                .insert_uploads(records.clone(), now)
                .await
                .map_err(internal)?;
            files.into_iter().for_each(|file| drop(file.keep()));
            self.outbox_wake.notify_one();
            return Ok(records);
        }
        // Sync: deliver, then record each upload once, in the state its delivery ended in: one
        // SQLite write per upload. An upload whose delivery the daemon did not live to finish
        // was never acknowledged; its spooled bytes are swept at the next start.
        let paths: Vec<PathBuf> = files.into_iter().map(SpooledFile::keep).collect();
        let mut failure = None;
        for (record, path) in records.iter_mut().zip(&paths) {
            if failure.is_some() {
                // The client is told the request failed: the files after it fail too.
                record.state = UploadState::Failed;
                record.last_error = Some("an earlier file of the same request failed".into());
                remove_quietly(path).await;
                continue;
            }
            match forward::deliver_now(self, &provider, record, path).await {
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
            if plan.has_quota() {
                // The client was told the request failed and will send it again: what was
                // not kept does not count against the day's quota.
                let not_kept = records
                    .iter()
                    .filter(|record| record.state != UploadState::Forwarded);
                let (bytes, uploads) = not_kept.fold((0, 0), |(bytes, uploads), record| {
                    (bytes + record.size, uploads + 1)
                });
                if let Err(error) = self
                    .store
                    .refund_usage(tenant.name.clone(), day, bytes, uploads)
                    .await
                {
                    tracing::error!(%error, tenant = %tenant.name, "cannot give back quota of a failed upload");
                }
            }
        }
        self.store
            .insert_uploads(records.clone(), now)
            .await
            .map_err(internal)?;
        match failure {
            Some(error) => Err(error),
            None => Ok(records),
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
            match forward::delete_upstream(self, provider, record, remote_id).await {
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

    /// Admission, intake and acceptance for a dialect whose upload is one multipart request.
    pub async fn upload_multipart(
        &self,
        dialect: &dyn Dialect,
        request: &HttpRequest,
        payload: Payload,
        spec: &FormSpec,
        metadata_of: impl FnOnce(&Received) -> Result<Metadata, ApiError>,
    ) -> Result<Vec<UploadRecord>, ApiError> {
        let admission = self.admit(dialect, request).await?;
        let received = self
            .receive(&admission, dialect.name(), request, payload, spec)
            .await?;
        let metadata = metadata_of(&received)?;
        self.accept(&admission, dialect.name(), received.files, metadata)
            .await
    }

    /// Deletes an upload of the admitted tenant: local bytes, upstream copy, record state.
    pub async fn delete(
        &self,
        admission: &Admission,
        dialect: DialectName,
        id: &str,
    ) -> Result<UploadRecord, ApiError> {
        let record = self
            .store
            .upload_of(admission.tenant.name.clone(), id.to_owned())
            .await
            .map_err(internal)?;
        self.delete_record(&admission.policy, dialect, record).await
    }

    /// Deletes any tenant's upload, for the operator (`upgate uploads delete`).
    pub async fn delete_as_operator(&self, id: &str) -> Result<UploadRecord, ApiError> {
        let record = self.store.upload(id.to_owned()).await.map_err(internal)?;
        let dialect = record
            .as_ref()
            .and_then(|record| DialectName::parse(&record.dialect))
            .unwrap_or(DialectName::Dify);
        self.delete_record(&self.policy(), dialect, record).await
    }

    /// What a delete does: the upstream copy (through the provider that stored it, as
    /// configured now), the spooled bytes, then the record's state.
    async fn delete_record(
        &self,
        policy: &Policy,
        dialect: DialectName,
        record: Option<UploadRecord>,
    ) -> Result<UploadRecord, ApiError> {
        let record = record
            .filter(|record| record.state != UploadState::Deleted)
            .ok_or(ApiError::NotFound)?;
        if let Some(remote_id) = record.remote_id.clone() {
            let provider = policy
                .providers
                .get(&record.provider)
                .cloned()
                .ok_or(ApiError::Internal)?;
            forward::delete_upstream(self, &provider, &record, remote_id).await?;
        }
        remove_quietly(&self.spool.path_of(&record.id)).await;
        self.store
            .mark_deleted(record.id.clone())
            .await
            .map_err(internal)?;
        metrics::upload_outcome(dialect, &record.provider, "deleted");
        Ok(record)
    }
}

/// The tenant a request was identified as, for the request log (set on the request by
/// [`Gateway::admit`] once its key is known).
#[derive(Debug, Clone)]
pub struct RequestTenant(pub String);

/// Logs a store failure and hides it from the client.
pub fn internal(error: StoreError) -> ApiError {
    tracing::error!(%error, "store failure");
    ApiError::Internal
}

/// Removes a file if it is there. A single unlink: cheaper inline than on another thread.
pub async fn remove_quietly(path: &Path) {
    let _ = std::fs::remove_file(path);
}
