//! Limits: the checks that count requests, uploads in progress and bytes per day.
//!
//! What flows through here: a key's digest and its plan's rate limit, a tenant's (or the
//! daemon's) concurrency cap, and a tenant's daily usage against its quota. Out come
//! verdicts: `Ok`, or a [`LimitError`] (how long to wait, every slot taken, or the shared
//! limits unavailable). The [`Limiter`] trait is the seam for where that state lives:
//! [`local::LocalLimiter`] keeps rate and concurrency in this process (`governor` buckets,
//! semaphores) and quotas in the store; [`redis::RedisLimiter`] shares key rates and tenant
//! concurrency between nodes through Redis (`server.limits`), and leaves the rest to a
//! `LocalLimiter`. Nothing here knows about HTTP or dialects.

pub(crate) mod local;
pub(crate) mod redis;

use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::config::RateLimitConfig;
use crate::config::keys::KeyDigest;
use crate::store::StoreError;

/// What a concurrency cap counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Scope {
    /// Uploads in progress on this daemon (`server.max_concurrent_uploads`).
    Daemon,
    /// Uploads in progress of one tenant (its plan's `max_concurrent_uploads`).
    Tenant(String),
}

/// Why a limit did not let a request through.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub(crate) enum LimitError {
    /// Over the key's rate: how long until it would pass.
    #[error("over the rate limit for {0:?}")]
    Rate(Duration),
    /// Every slot of the cap is taken.
    #[error("every slot of the concurrency cap is taken")]
    Busy,
    /// The shared limits could not be asked, and this node may not count on its own
    /// (`server.limits.fault_tolerant: false`).
    #[error("the shared limits are unavailable: {0}")]
    Unavailable(String),
}

/// A slot of a concurrency cap, given back when dropped.
pub(crate) type Slot = Box<dyn Send + Sync>;

/// Daily usage of a tenant: (bytes, uploads).
pub(crate) type Usage = (u64, u64);

/// Where the counters of rate limits, concurrency caps and quotas live.
pub(crate) trait Limiter: Send + Sync {
    /// Counts one request of `key` under `limit`: [`LimitError::Rate`] says how long until
    /// it would pass.
    fn take(&self, key: KeyDigest, limit: RateLimitConfig) -> BoxFuture<'_, Result<(), LimitError>>;

    /// A slot of `scope` among `cap`: [`LimitError::Busy`] when all are taken.
    fn acquire(&self, scope: Scope, cap: usize) -> BoxFuture<'_, Result<Slot, LimitError>>;

    /// A tenant's usage on `day` (days since the epoch).
    fn usage(&self, tenant: String, day: i64) -> BoxFuture<'_, Result<Usage, StoreError>>;

    /// Adds usage if it stays within `limits` (bytes, uploads); `false` if it would not.
    fn try_add_usage(
        &self,
        tenant: String,
        day: i64,
        added: Usage,
        limits: (Option<u64>, Option<u64>),
    ) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Gives back usage of uploads the client was told failed.
    fn refund_usage(&self, tenant: String, day: i64, refund: Usage) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Why `/readyz` should fail because of the limits' backend, if it should (a shared one
    /// that cannot answer, when requests would be refused for it).
    fn unready(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async { None })
    }
}
