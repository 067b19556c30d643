//! In-process limits, the embedded default: a `governor` bucket per key, a semaphore per
//! concurrency scope, and daily usage in the store.
//!
//! What flows through here: the key digests and tenant names of admitted requests (only
//! keys the config knows reach a bucket, so memory is bounded by the config). A bucket is
//! kept per (key, limit): a reload that leaves a rate unchanged keeps its bucket (a SIGHUP
//! does not refill it), a changed rate starts afresh. A concurrency scope keeps one count
//! of the slots in use whatever its cap: a reload that changes the cap applies it to the
//! uploads already in flight (lowered below them, no new one starts until enough end).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::future::{self, BoxFuture};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::{LimitError, Limiter, Scope, Slot, Usage};
use crate::config::RateLimitConfig;
use crate::config::keys::KeyDigest;
use crate::store::{Store, StoreError};

/// A key's governor bucket and the limit it was built for.
struct KeyBucket {
    limit: RateLimitConfig,
    bucket: DefaultDirectRateLimiter,
}

impl KeyBucket {
    /// `None` only for limits config validation refuses (a period outside what governor
    /// can represent).
    fn new(limit: RateLimitConfig) -> Option<Arc<Self>> {
        let period = Duration::try_from_secs_f64(1.0 / limit.requests_per_second).ok()?;
        let burst = NonZeroU32::new(limit.burst)?;
        let quota = Quota::with_period(period)?.allow_burst(burst);
        Some(Arc::new(Self {
            limit,
            bucket: RateLimiter::direct(quota),
        }))
    }
}

/// A slot of a concurrency scope: counted in use until dropped.
struct CountedSlot(Arc<AtomicUsize>);

impl Drop for CountedSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Rate and concurrency in this process; quotas in `store`.
pub(crate) struct LocalLimiter {
    store: Arc<dyn Store>,
    buckets: RwLock<HashMap<KeyDigest, Arc<KeyBucket>>>,
    /// Slots in use per scope.
    in_use: Mutex<HashMap<Scope, Arc<AtomicUsize>>>,
}

impl LocalLimiter {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            buckets: RwLock::default(),
            in_use: Mutex::default(),
        }
    }

    fn bucket(&self, key: KeyDigest, limit: RateLimitConfig) -> Option<Arc<KeyBucket>> {
        let current = self
            .buckets
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        match current {
            Some(bucket) if bucket.limit == limit => Some(bucket),
            _ => {
                let bucket = KeyBucket::new(limit)?;
                let mut buckets = self.buckets.write().unwrap_or_else(|e| e.into_inner());
                let kept = buckets
                    .entry(key)
                    .and_modify(|existing| {
                        if existing.limit != limit {
                            *existing = bucket.clone();
                        }
                    })
                    .or_insert(bucket);
                Some(kept.clone())
            }
        }
    }

    /// Counts a request against the key's bucket, right now.
    pub(crate) fn take_now(&self, key: KeyDigest, limit: RateLimitConfig) -> Result<(), LimitError> {
        let Some(bucket) = self.bucket(key, limit) else {
            return Ok(());
        };
        bucket
            .bucket
            .check()
            .map_err(|not_until| LimitError::Rate(not_until.wait_time_from(DefaultClock::default().now())))
    }

    /// A slot of `scope` among `cap` in this process, right now.
    pub(crate) fn acquire_now(&self, scope: Scope, cap: usize) -> Result<Slot, LimitError> {
        let in_use = self
            .in_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(scope)
            .or_default()
            .clone();
        in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < cap).then_some(taken + 1)
            })
            .map_err(|_| LimitError::Busy)?;
        Ok(Box::new(CountedSlot(in_use)))
    }
}

impl Limiter for LocalLimiter {
    fn take(&self, key: KeyDigest, limit: RateLimitConfig) -> BoxFuture<'_, Result<(), LimitError>> {
        Box::pin(future::ready(self.take_now(key, limit)))
    }

    fn acquire(&self, scope: Scope, cap: usize) -> BoxFuture<'_, Result<Slot, LimitError>> {
        Box::pin(future::ready(self.acquire_now(scope, cap)))
    }

    fn usage(&self, tenant: String, day: i64) -> BoxFuture<'_, Result<Usage, StoreError>> {
        self.store.usage(tenant, day)
    }

    fn try_add_usage(
        &self,
        tenant: String,
        day: i64,
        added: Usage,
        limits: (Option<u64>, Option<u64>),
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        self.store.try_add_usage(tenant, day, added.0, added.1, limits)
    }

    fn refund_usage(&self, tenant: String, day: i64, refund: Usage) -> BoxFuture<'_, Result<(), StoreError>> {
        self.store.refund_usage(tenant, day, refund.0, refund.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Durability;
    use crate::store::sqlite::SqliteStore;

    #[tokio::test]
    async fn a_reload_keeps_buckets_whose_limits_did_not_change_and_counts_slots_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path(), Durability::ProcessCrash).unwrap());
        let limiter = LocalLimiter::new(store);
        let key = KeyDigest::of("k");
        let tenant = || Scope::Tenant("t".into());
        let limit = RateLimitConfig {
            requests_per_second: 0.001,
            burst: 2,
        };
        limiter.take(key, limit).await.unwrap();
        drop(limiter.acquire(tenant(), 1).await.unwrap());
        limiter.take(key, limit).await.unwrap();
        let in_flight = limiter.acquire(tenant(), 1).await.unwrap();
        // Same limits (a reload that did not change them): the bucket stays empty and the
        // upload in flight still holds the tenant's only slot.
        assert!(matches!(limiter.take(key, limit).await, Err(LimitError::Rate(_))));
        let roomier = RateLimitConfig { burst: 3, ..limit };
        // A changed limit starts from a fresh bucket...
        limiter.take(key, roomier).await.unwrap();
        // ...while the cap, unchanged, is still taken.
        assert_eq!(limiter.acquire(tenant(), 1).await.err(), Some(LimitError::Busy));
        drop(in_flight);
        assert!(limiter.acquire(tenant(), 1).await.is_ok());
        // Another tenant has its own slots. A changed cap counts the slots already taken: 4
        // uploads in flight, the cap lowered to 2 then raised to 5.
        let other = || Scope::Tenant("u".into());
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(limiter.acquire(other(), 4).await.unwrap());
        }
        assert_eq!(limiter.acquire(other(), 2).await.err(), Some(LimitError::Busy));
        held.truncate(2);
        assert_eq!(limiter.acquire(other(), 2).await.err(), Some(LimitError::Busy));
        held.truncate(1);
        held.push(limiter.acquire(other(), 2).await.unwrap());
        for _ in 0..3 {
            held.push(limiter.acquire(other(), 5).await.unwrap());
        }
        assert_eq!(limiter.acquire(other(), 5).await.err(), Some(LimitError::Busy));
    }
}
