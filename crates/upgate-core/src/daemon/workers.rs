//! Background workers: the loops that run beside the listeners until the process ends.
//!
//! What flows through here: time. The outbox loop claims due async uploads from the store
//! (no more at once than `forward_concurrency` deliveries in flight) and hands each to
//! [`deliver::deliver_from_outbox`]; the housekeeping loop sweeps
//! sessions ([`Gateway::sweep_sessions`]) and interrupted sync deliveries
//! ([`Gateway::fail_interrupted_deliveries`]) and refreshes the gauges and the disk floor.
//! The work itself lives in `upload/`; these are only its clocks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ServerConfig;
use crate::metrics;
use crate::upload::{Gateway, deliver};
use crate::vocab::now_ms;

/// Attempts (a minute apart) an outbox upload whose provider is no longer configured gets
/// before it is failed.
const PROVIDER_GONE_ATTEMPTS: u32 = 10;

/// The async delivery loop: claims due uploads from the outbox and attempts each once,
/// rescheduling failures with backoff. Runs until the daemon stops, then waits at most
/// `drain` for the deliveries in flight (one cut off is claimed again when its lease ends).
pub(crate) async fn run_outbox(gateway: Arc<Gateway>, drain: Duration) {
    const BATCH: usize = 32;
    // Deliveries in flight at once: no more than plugin calls may run, so that a backlog
    // waits in the store (claimable by other nodes), not as tasks and blocking threads here.
    let slots = gateway.policy().config.server.forward_concurrency.max(1);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(slots));
    while !gateway.stopping() {
        // At least one slot free before claiming; then as many as are free.
        let Ok(first) = in_flight.clone().acquire_owned().await else {
            return;
        };
        drop(first);
        let room = in_flight.available_permits().clamp(1, BATCH);
        let policy = gateway.policy();
        // Long enough for the slowest provider's attempt (bounded by its `timeout`) to end
        // before a second poll could claim the same upload.
        let longest_attempt = policy
            .providers
            .values()
            .map(|provider| provider.config.timeout.0)
            .max()
            .unwrap_or_default();
        let lease_ms = (longest_attempt + deliver::OUTBOX_LEASE_MARGIN).as_millis() as i64;
        let claimed_at = Instant::now();
        match gateway.store.claim_due(now_ms(), room, lease_ms).await {
            Ok(claim) => {
                let lease = deliver::OutboxLease {
                    token: claim.lease_until,
                    ends: claimed_at + Duration::from_millis(lease_ms.unsigned_abs()),
                };
                let full = claim.due.len() == room;
                for record in claim.due {
                    let Some(provider) = policy.providers.get(&record.provider).cloned() else {
                        // A provider removed (or renamed) by a reload: tried again each minute
                        // in case the config is put right, and failed after
                        // PROVIDER_GONE_ATTEMPTS, so that `uploads list --state failed` shows
                        // it; `uploads retry` sends it again once the provider is back.
                        let attempts = record.attempts.saturating_add(1);
                        let retry_at = (attempts < PROVIDER_GONE_ATTEMPTS).then(|| now_ms() + 60_000);
                        tracing::error!(upload_id = %record.id, provider = %record.provider, attempts,
                            "the upload's provider is no longer configured");
                        let _ = gateway
                            .store
                            .mark_attempt_failed(
                                record.id.clone(),
                                format!("provider {} is not configured", record.provider),
                                attempts,
                                retry_at,
                                lease.token,
                            )
                            .await;
                        continue;
                    };
                    let gateway = gateway.clone();
                    let slot = in_flight.clone().try_acquire_owned().ok();
                    actix_web::rt::spawn(async move {
                        deliver::deliver_from_outbox(&gateway, &provider, record, lease).await;
                        drop(slot);
                    });
                }
                if full {
                    continue;
                }
            }
            Err(error) => tracing::error!(%error, "outbox poll failed"),
        }
        if let Ok(pending) = gateway.store.outbox_len().await {
            metrics::outbox_pending(pending);
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), gateway.outbox_wake.notified()).await;
    }
    let all = u32::try_from(slots).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, in_flight.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            "stopping with async deliveries still in flight; they are claimed again when their lease ends"
        );
    }
}

/// Sweeps expired sessions and interrupted sync deliveries and refreshes gauges every
/// `sweep_interval`.
pub(crate) async fn run_housekeeping(gateway: Arc<Gateway>, server: ServerConfig) {
    while !gateway.stopping() {
        gateway.sweep_sessions().await;
        gateway.fail_interrupted_deliveries().await;
        if let Ok((sessions, bytes)) = gateway.store.session_totals().await {
            metrics::get()
                .sessions_active
                .set(i64::try_from(sessions).unwrap_or(i64::MAX));
            metrics::get()
                .sessions_bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        let spool = gateway.spool.clone();
        let data_dir = server.data_dir.clone();
        let floor = server.disk_free_floor.0;
        let below = tokio::task::spawn_blocking(move || {
            metrics::get().spool_bytes.set(spool.bytes_on_disk() as i64);
            metrics::watch_disk(&data_dir, floor)
        })
        .await;
        if let Ok(Some(below)) = below {
            gateway.set_below_disk_floor(below);
        }
        tokio::time::sleep(server.sweep_interval.0.min(std::time::Duration::from_secs(60))).await;
    }
}
