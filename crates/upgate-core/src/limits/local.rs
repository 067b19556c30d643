//! In-process limits, the embedded default: a `governor` bucket per key, a semaphore per
//! concurrency scope, and daily usage in the store.
//!
//! What flows through here: the key digests and tenant names of admitted requests (only
//! keys the config knows reach a bucket, so memory is bounded by the config). State is
//! kept per (key, limit) and (scope, cap): a reload that leaves a limit unchanged keeps its
//! bucket and its semaphore (and the slots uploads in flight hold), so a SIGHUP neither
//! refills buckets nor lets a tenant past its cap; a changed limit starts afresh.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::future::{self, BoxFuture};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;

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

/// A concurrency cap and the semaphore that enforces it.
struct Cap {
    cap: usize,
    semaphore: Arc<Semaphore>,
}

/// Rate and concurrency in this process; quotas in `store`.
pub(crate) struct LocalLimiter {
    store: Arc<dyn Store>,
    buckets: RwLock<HashMap<KeyDigest, Arc<KeyBucket>>>,
    caps: Mutex<HashMap<Scope, Arc<Cap>>>,
}

impl LocalLimiter {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            buckets: RwLock::default(),
            caps: Mutex::default(),
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
        let semaphore = {
            let mut caps = self.caps.lock().unwrap_or_else(|e| e.into_inner());
            let entry = caps.entry(scope).or_insert_with(|| new_cap(cap));
            if entry.cap != cap {
                *entry = new_cap(cap);
            }
            entry.semaphore.clone()
        };
        let permit = semaphore.try_acquire_owned().map_err(|_| LimitError::Busy)?;
        Ok(Box::new(permit))
    }
}

fn new_cap(cap: usize) -> Arc<Cap> {
    Arc::new(Cap {
        cap,
        semaphore: Arc::new(Semaphore::new(cap)),
    })
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
    async fn a_reload_keeps_buckets_and_slots_whose_limits_did_not_change() {
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
        // Another tenant has its own slots; a changed cap starts afresh.
        let other = limiter.acquire(Scope::Tenant("u".into()), 1).await.unwrap();
        assert!(limiter.acquire(Scope::Tenant("u".into()), 2).await.is_ok());
        drop(other);
    }
}
