//! Delivery: stored uploads handed to provider plugins, with retries.
//!
//! What flows through here: an [`UploadRecord`] and its spool path, turned into a plugin
//! [`PutRequest`] and run on a blocking thread (bounded by `forward_concurrency`, each call
//! bounded by the provider's `timeout`). Failures are classified once: connection errors,
//! timeouts, 5xx and 429 are retried with exponential backoff and jitter (honouring an
//! upstream `Retry-After`); other refusals are not. Sync delivery retries inside the
//! request; async delivery takes one claimed outbox entry at a time (the polling loop is
//! `daemon::workers`), so it survives restarts. Every attempt is recorded in the upload's row.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use upgate_plugin_api::{DeleteRequest, ErrorKind, PluginError, PutRequest, PutResult};

use crate::config::RetryConfig;
use crate::error::ApiError;
use crate::metrics;
use crate::plugins::Provider;
use crate::store::UploadRecord;
use crate::vocab::now_ms;

use super::pass_through::PassThrough;
use super::plugin_call::{PendingCall, delete_of, delete_unclaimed};
use super::{Gateway, remove_quietly};

/// How one attempt ended.
#[derive(Debug)]
enum Attempt {
    Delivered(PutResult),
    /// Worth retrying, after at least this long (the upstream's Retry-After).
    Retry(PluginError, Option<Duration>),
    Fatal(PluginError),
}

fn outcome_label(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::Config => "config",
        ErrorKind::Rejected => "rejected",
        ErrorKind::Unavailable => "unavailable",
        ErrorKind::Timeout => "timeout",
        ErrorKind::NotFound => "not_found",
        ErrorKind::Internal => "internal",
        ErrorKind::Panic => "panic",
        ErrorKind::NotStreamed => "not_streamed",
        ErrorKind::Busy => "busy",
    }
}

fn put_request(record: &UploadRecord, path: &Path, limit: Duration) -> PutRequest {
    PutRequest {
        upload_id: record.id.clone(),
        filename: record.filename.clone(),
        extension: record.extension.clone(),
        mime_type: record.mime.clone(),
        size: record.size,
        sha256: record.sha256.clone(),
        path: path.display().to_string(),
        tenant: record.tenant.clone(),
        dialect: record.dialect.as_str().to_owned(),
        metadata: record.metadata.clone(),
        deadline_ms: Some(
            crate::vocab::now_ms().saturating_add(i64::try_from(limit.as_millis()).unwrap_or(i64::MAX)),
        ),
    }
}

/// Largest upload a plugin that declared `FLAG_LOCAL_IO` is handed on the async worker.
const INLINE_PUT: u64 = 256 * 1024;

/// Where a plugin call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Runs {
    /// On a blocking thread, bounded by `forward_concurrency` and a deadline.
    Blocking(Duration),
    /// Right here: only for plugins that do local file-system work, on small files.
    Inline,
}

impl Runs {
    fn for_upload(provider: &Provider, size: u64, limit: Duration) -> Self {
        if provider.plugin.local_io() && !provider.durable && size <= INLINE_PUT {
            Self::Inline
        } else {
            Self::Blocking(limit)
        }
    }
}

/// Runs one plugin call (see [`Runs`]) and records its duration and outcome. A blocking
/// call that succeeds after the host stopped waiting goes to `unclaimed`.
async fn call_plugin<T: Send + 'static>(
    gateway: &Gateway,
    provider: &Arc<Provider>,
    runs: Runs,
    call: impl FnOnce(&Provider) -> Result<T, PluginError> + Send + 'static,
    unclaimed: Option<Box<dyn FnOnce(T) + Send>>,
) -> Result<T, PluginError> {
    let started = Instant::now();
    let result = match runs {
        Runs::Inline => call(provider),
        Runs::Blocking(limit) => call_blocking(gateway, provider, limit, call, unclaimed).await,
    };
    observe(provider, started, &result);
    result
}

/// Counts a plugin call that began at `started`: its duration and outcome, its error.
fn observe<T>(provider: &Provider, started: Instant, result: &Result<T, PluginError>) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(error) => {
            metrics::plugin_error(&provider.name, outcome_label(error.kind));
            outcome_label(error.kind)
        }
    };
    metrics::upstream_duration(&provider.name, outcome, started.elapsed());
}

/// What a client is told to wait when every delivery slot stayed taken.
const BUSY_RETRY_AFTER_SECS: u64 = 5;

/// A plugin call on a blocking thread, once a delivery slot is free, both within `limit`.
async fn call_blocking<T: Send + 'static>(
    gateway: &Gateway,
    provider: &Arc<Provider>,
    limit: Duration,
    call: impl FnOnce(&Provider) -> Result<T, PluginError> + Send + 'static,
    unclaimed: Option<Box<dyn FnOnce(T) + Send>>,
) -> Result<T, PluginError> {
    let deadline = tokio::time::Instant::now() + limit;
    // Local capacity, not the upstream's: the client is told to come back (503).
    let busy = |why: String| PluginError {
        retry_after_secs: Some(BUSY_RETRY_AFTER_SECS),
        ..PluginError::new(ErrorKind::Busy, why)
    };
    let slot = tokio::time::timeout_at(deadline, gateway.delivery_slots.clone().acquire_owned())
        .await
        .map_err(|_| {
            busy(format!(
                "no delivery slot free within {limit:?} (forward_concurrency)"
            ))
        })?
        .map_err(|_| busy("the daemon is stopping".into()))?;
    PendingCall::spawn(provider, slot, call, unclaimed)
        .wait_until(deadline)
        .await
}

async fn attempt(
    gateway: &Gateway,
    provider: &Arc<Provider>,
    record: &UploadRecord,
    path: &Path,
    limit: Duration,
) -> Attempt {
    let request = put_request(record, path, limit);
    let runs = Runs::for_upload(provider, record.size, limit);
    let unclaimed = delete_unclaimed(
        provider,
        delete_of(&record.id, record.dialect.as_str(), &record.metadata),
    );
    let put = move |provider: &Provider| provider.put(&request);
    judge(call_plugin(gateway, provider, runs, put, Some(unclaimed)).await)
}

/// What a put's result means for the delivery: done, worth retrying, or failed for good.
fn judge(result: Result<PutResult, PluginError>) -> Attempt {
    match result {
        Ok(result) => Attempt::Delivered(result),
        Err(error) => match error.kind {
            ErrorKind::Unavailable | ErrorKind::Timeout => {
                let wait = error.retry_after_secs.map(Duration::from_secs);
                Attempt::Retry(error, wait)
            }
            _ => Attempt::Fatal(error),
        },
    }
}

/// Records an outbox delivery (`true`), retrying while the store is unavailable until the
/// claim's lease ends; `false` when the claim no longer holds (deleted, or claimed again). A
/// try whose commit went through but whose answer was lost is recognised on the next try.
async fn record_delivery(
    gateway: &Gateway,
    record: &UploadRecord,
    result: &PutResult,
    attempts: u32,
    lease: OutboxLease,
) -> Result<bool, crate::store::StoreError> {
    let mut wait = Duration::from_secs(1);
    let mut tried = false;
    loop {
        let marked = gateway
            .store
            .mark_forwarded(
                record.id.clone(),
                result.remote_id.clone(),
                result.url.clone(),
                attempts,
                lease.token,
            )
            .await;
        match marked {
            Ok(false) if tried => {
                let current = gateway.store.upload(record.id.clone()).await;
                return Ok(matches!(current, Ok(Some(current))
                    if current.state == crate::store::UploadState::Forwarded
                        && current.remote_id.as_deref() == Some(result.remote_id.as_str())));
            }
            Ok(marked) => return Ok(marked),
            Err(error) => {
                if Instant::now()
                    .checked_add(wait)
                    .is_none_or(|then| then >= lease.ends)
                {
                    return Err(error);
                }
                tried = true;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The longest wait an upstream's `Retry-After` (passed on by its plugin) is taken for.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Exponential backoff with full jitter for retry number `attempt` (1-based), at least
/// `floor` (an upstream's Retry-After), at most the configured maximum.
pub(crate) fn backoff(retry: &RetryConfig, attempt: u32, floor: Option<Duration>) -> Duration {
    let floor = floor.map(|floor| floor.min(MAX_RETRY_AFTER));
    let base = retry
        .initial_backoff
        .0
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let capped = base.min(retry.max_backoff.0);
    let jittered = capped.mul_f64(rand::rng().random_range(0.5..=1.0));
    jittered
        .max(floor.unwrap_or_default())
        .min(retry.max_backoff.0.max(floor.unwrap_or_default()))
}

/// A sync delivery that worked.
#[derive(Debug)]
pub(crate) struct Delivered {
    pub(crate) result: PutResult,
    pub(crate) attempts: u32,
}

/// A sync delivery that failed for good.
#[derive(Debug)]
pub(crate) struct NotDelivered {
    /// What the client is told.
    pub(crate) error: ApiError,
    /// What the record keeps (`last_error`).
    pub(crate) reason: String,
    pub(crate) attempts: u32,
}

/// Delivers one upload now (sync mode), retrying within the provider's timeout. The first
/// attempt is `streaming`'s when the upload was passed through while it arrived (its end is
/// released here), later ones put the spooled copy; before a retry, the streams of the
/// request's `later` files are aborted. The caller records the outcome; the spooled bytes
/// are gone either way (delivered, or the client is told it failed).
pub(crate) async fn deliver_now(
    gateway: &Gateway,
    provider: &Arc<Provider>,
    record: &UploadRecord,
    path: &Path,
    mut streaming: Option<PassThrough>,
    later: &mut [Option<PassThrough>],
) -> Result<Delivered, NotDelivered> {
    let config = &provider.config;
    let deadline = Instant::now() + config.timeout.0;
    let mut attempts = 0;
    let failed = loop {
        attempts += 1;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let streamed = match streaming.take() {
            // Boxed: the streamed attempt's waits stay out of every sync delivery's future.
            Some(stream) => Some((
                stream.started(),
                Box::pin(stream.finish(&record.metadata, remaining)).await,
            )),
            None => None,
        };
        let outcome = match streamed {
            // The provider declined to stream this upload, or its upstream takes no body of
            // unknown length (411 Length Required): its put of the spooled copy, whose length
            // is known, is the first attempt.
            Some((_, Err(declined)))
                if declined.kind == ErrorKind::NotStreamed || declined.status == Some(411) =>
            {
                attempt(gateway, provider, record, path, remaining).await
            }
            Some((started, result)) => {
                observe(provider, started, &result);
                // A streamed upload never had the spooled file: it is not the plugin's to move.
                judge(result.map(|streamed| PutResult {
                    consumed_file: false,
                    ..streamed
                }))
            }
            None => attempt(gateway, provider, record, path, remaining).await,
        };
        match outcome {
            Attempt::Delivered(result) => {
                finish_delivered(provider, record, path, &result).await;
                return Ok(Delivered { result, attempts });
            }
            Attempt::Retry(error, floor) if attempts < config.max_attempts() => {
                let wait = backoff(&config.retry, attempts, floor);
                if Instant::now().checked_add(wait).is_none_or(|at| at >= deadline) {
                    break error;
                }
                metrics::retry(&provider.name);
                // The request's later files stop streaming (they go from the spool after
                // this one): their upstream requests would sit idle through this file's
                // retries, holding delivery slots this retry may need.
                later.iter_mut().for_each(|stream| drop(stream.take()));
                tracing::warn!(upload_id = %record.id, provider = %provider.name, attempt = attempts,
                    error = %error, "delivery failed, retrying in {wait:?}");
                tokio::time::sleep(wait).await;
            }
            Attempt::Retry(error, _) | Attempt::Fatal(error) => break error,
        }
    };
    tracing::warn!(upload_id = %record.id, provider = %record.provider, attempts, error = %failed, "delivery failed");
    remove_quietly(path);
    metrics::upload_outcome(record.dialect, &record.provider, "failed");
    Err(NotDelivered {
        error: ApiError::from(&failed),
        reason: failed.message,
        attempts,
    })
}

/// After a successful put: the spool copy goes (unless the plugin moved it away, as the local
/// provider does) and the delivery is counted.
async fn finish_delivered(provider: &Provider, record: &UploadRecord, path: &Path, result: &PutResult) {
    if !result.consumed_file {
        remove_quietly(path);
    }
    metrics::upload_delivered(record.dialect, &provider.name, record.size);
}

/// Removes the persisted bytes of a delivered or deleted upload (this node's copy, and the
/// shared spool's object); a failure is logged (the starting node's orphan sweep retries).
pub(crate) async fn remove_persisted(gateway: &Gateway, id: &str) {
    let (spool, owned) = (gateway.spool.clone(), id.to_owned());
    gateway.remove_spooled(id, move || spool.remove(&owned)).await;
}

/// Asks the provider to delete an upload upstream. "Not found" upstream counts as deleted.
pub(crate) async fn delete_upstream(
    gateway: &Gateway,
    provider: &Arc<Provider>,
    record: &UploadRecord,
    remote_id: String,
) -> Result<(), ApiError> {
    let request = DeleteRequest {
        remote_id,
        ..delete_of(&record.id, record.dialect.as_str(), &record.metadata)
    };
    let runs = if provider.plugin.local_io() {
        Runs::Inline
    } else {
        Runs::Blocking(provider.config.timeout.0)
    };
    match call_plugin(gateway, provider, runs, move |p| p.delete(&request), None).await {
        Ok(()) => Ok(()),
        Err(error) if error.kind == ErrorKind::NotFound => Ok(()),
        Err(error) => Err(ApiError::from(&error)),
    }
}

/// Whether a delivery went where every delivery of the upload goes: a provider whose remote
/// id follows from the upload (the local one's `<root>/<id>`). Another claim's delivery is
/// in that same place, so it is never deleted as a superseded copy.
fn delivered_in_place(record: &UploadRecord, result: &PutResult) -> bool {
    result.remote_id == record.id
}

/// How long the outbox waits before fetching an upload's bytes again from a shared spool
/// that was unavailable.
const SPOOL_OUTAGE_WAIT: Duration = Duration::from_secs(30);

/// What an outbox lease adds to the longest attempt a provider may take.
pub(crate) const OUTBOX_LEASE_MARGIN: Duration = Duration::from_secs(60);

/// The lease under which the outbox claimed an upload ([`crate::store::Claim`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct OutboxLease {
    /// The claim's fencing token, on the store's clock: what is recorded under the claim
    /// presents it.
    pub(crate) token: i64,
    /// When the lease ends on this node's monotonic clock (counted from before the claim,
    /// so never later than the store's end): the node stops trying to record by then.
    pub(crate) ends: Instant,
}

/// Delivers one upload claimed from the outbox (under `lease`), once, and records how it went: delivered, rescheduled with backoff, or
/// failed for good (its bytes kept for the operator). An attempt that outlived its lease
/// while another node (or poll) claimed the upload again records nothing over that claim:
/// its delivered copy is deleted upstream and the record gets a note of it.
pub(crate) async fn deliver_from_outbox(
    gateway: &Gateway,
    provider: &Arc<Provider>,
    record: UploadRecord,
    lease: OutboxLease,
) {
    let mut attempts = record.attempts + 1;
    // A shared spool downloads the bytes first when another node received them.
    let (spool, id, size) = (gateway.spool.clone(), record.id.clone(), record.size);
    let fetched = tokio::task::spawn_blocking(move || spool.fetch(&id, size)).await;
    let (path, outcome) = match fetched {
        Ok(Ok(path)) => {
            let outcome = attempt(gateway, provider, &record, &path, provider.config.timeout.0).await;
            (path, outcome)
        }
        // The shared spool is unavailable: the provider was not tried, so the attempt does
        // not count against `max_attempts` (an outage of the spool does not fail uploads for
        // good), and the next try waits as for a 503's Retry-After.
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::NotConnected => {
            attempts = record.attempts;
            (
                PathBuf::new(),
                Attempt::Retry(
                    PluginError::new(
                        ErrorKind::Unavailable,
                        format!("cannot fetch the spooled bytes: {error}"),
                    ),
                    Some(SPOOL_OUTAGE_WAIT),
                ),
            )
        }
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::NotFound => (
            PathBuf::new(),
            Attempt::Fatal(PluginError::new(
                ErrorKind::Internal,
                format!("the spooled bytes are gone: {error}"),
            )),
        ),
        Ok(Err(error)) => (
            PathBuf::new(),
            Attempt::Retry(
                PluginError::new(
                    ErrorKind::Unavailable,
                    format!("cannot fetch the spooled bytes: {error}"),
                ),
                None,
            ),
        ),
        Err(error) => (
            PathBuf::new(),
            Attempt::Retry(PluginError::new(ErrorKind::Internal, error.to_string()), None),
        ),
    };
    match outcome {
        Attempt::Delivered(result) => {
            // Recorded before the spool copy goes: a crash in between re-delivers rather
            // than loses.
            let recorded = record_delivery(gateway, &record, &result, attempts, lease).await;
            match recorded {
                Ok(true) => {
                    finish_delivered(provider, &record, &path, &result).await;
                    remove_persisted(gateway, &record.id).await;
                }
                Ok(false) => {
                    let current = gateway.store.upload(record.id.clone()).await;
                    let deleted = matches!(
                        &current,
                        Ok(Some(current)) if current.state == crate::store::UploadState::Deleted
                    );
                    // That place is the recorded (or the other claim's coming) delivery's too,
                    // and stays.
                    let same_target = !deleted
                        && (delivered_in_place(&record, &result)
                            || matches!(&current, Ok(Some(current))
                                if current.remote_id.as_deref() == Some(result.remote_id.as_str())));
                    if same_target {
                        tracing::warn!(upload_id = %record.id, provider = %provider.name,
                            "the outbox lease ran out during this delivery and the upload was delivered again to the same place; \
                             keeping it");
                        return;
                    }
                    if deleted {
                        // Deleted by its client while this attempt was in flight: the copy
                        // just made upstream goes too.
                        tracing::info!(upload_id = %record.id, provider = %provider.name,
                            "deleted during delivery; deleting the delivered copy");
                    } else {
                        // The lease ran out during the attempt and the upload was claimed
                        // again: that claim's delivery is the one recorded; this copy goes.
                        tracing::warn!(upload_id = %record.id, provider = %provider.name,
                            "the outbox lease ran out during this delivery and the upload was claimed again; \
                             deleting this delivery's copy");
                        let note = format!(
                            "a delivery that outlived its outbox lease also reached {} (remote id {}) and was deleted there",
                            provider.name, result.remote_id
                        );
                        if let Err(error) = gateway.store.note_superseded(record.id.clone(), note).await {
                            tracing::error!(upload_id = %record.id, %error, "cannot note a superseded delivery");
                        }
                    }
                    if deleted {
                        remove_persisted(gateway, &record.id).await;
                    }
                    // Otherwise the spooled bytes belong to the claim that is recorded.
                    if let Err(error) = delete_upstream(gateway, provider, &record, result.remote_id).await {
                        tracing::error!(upload_id = %record.id, provider = %provider.name, %error,
                            "cannot delete a copy whose delivery is not the recorded one");
                    }
                }
                Err(error) => {
                    // Not recorded within the claim: the upload stays in the outbox and is
                    // delivered again, so this copy must not stay beside that one (unless it is
                    // in the very place the next delivery writes).
                    tracing::error!(upload_id = %record.id, %error, "cannot record a delivery; it will be retried");
                    if !delivered_in_place(&record, &result)
                        && let Err(error) =
                            delete_upstream(gateway, provider, &record, result.remote_id).await
                    {
                        tracing::error!(upload_id = %record.id, provider = %provider.name, %error,
                            "cannot delete a delivered copy whose delivery was not recorded");
                    }
                }
            }
        }
        Attempt::Retry(error, floor) if attempts < provider.config.max_attempts() => {
            let wait = backoff(&provider.config.retry, attempts, floor);
            metrics::retry(&provider.name);
            tracing::warn!(upload_id = %record.id, provider = %provider.name, attempt = attempts, error = %error,
                "async delivery failed, next try in {wait:?}");
            let retry_at = now_ms().saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
            match gateway
                .store
                .mark_attempt_failed(
                    record.id.clone(),
                    error.message,
                    attempts,
                    Some(retry_at),
                    lease.token,
                )
                .await
            {
                Ok(true) => {}
                Ok(false) => tracing::warn!(upload_id = %record.id,
                    "deleted or claimed again during the attempt; nothing recorded of it"),
                Err(store_error) => tracing::error!(%store_error, "cannot reschedule a delivery"),
            }
        }
        Attempt::Retry(error, _) | Attempt::Fatal(error) => {
            // The client was already answered: keep the spooled bytes for the operator.
            tracing::error!(upload_id = %record.id, provider = %provider.name, attempts, error = %error,
                "async delivery failed for good; the file stays in the spool");
            let _ = gateway
                .store
                .mark_attempt_failed(record.id.clone(), error.message, attempts, None, lease.token)
                .await;
            metrics::upload_outcome(record.dialect, &provider.name, "failed");
        }
    }
}

#[cfg(test)]
mod tests;
