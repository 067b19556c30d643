//! Policy: who is calling, and what their plan lets them do.
//!
//! What flows through here: the key a dialect extracted from the request, hashed and looked
//! up among configured keys (an unknown key never reaches a rate limiter, so limiter memory
//! is bounded by the config); the tenant's dialect grants; its per-key `governor` rate
//! limiter; its per-tenant and the daemon's global concurrency caps; its plan's size limit,
//! extension allowlist and daily quotas. Out come verdicts ([`Admission`] or an
//! [`ApiError`]) that dialects only render. A [`Policy`] is an immutable snapshot: reload
//! swaps in a new one, and requests in flight keep the one they started with.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{Config, DialectGrant, PlanConfig, RateLimitConfig};
use crate::dialects::DialectName;
use crate::error::{ApiError, Throttle};
use crate::plugins::Provider;

/// sha256 of an API key: how keys are compared and stored in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// A key as written in config: plain, or `sha256:<64 hex digits>`.
    pub fn from_config(entry: &str) -> Result<Self, String> {
        match entry.strip_prefix("sha256:") {
            Some(hex_digest) => {
                let bytes =
                    hex::decode(hex_digest).map_err(|_| "a `sha256:` key needs 64 hex digits".to_owned())?;
                let digest: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| "a `sha256:` key needs 64 hex digits".to_owned())?;
                Ok(Self(digest))
            }
            None if entry.trim().is_empty() => Err("a key may not be empty".into()),
            None if entry.chars().any(|c| c.is_control() || c == ' ') => {
                Err("a key may not hold spaces or control characters".into())
            }
            None => Ok(Self::of(entry)),
        }
    }
}

/// A plan, compiled from config.
#[derive(Debug)]
pub struct Plan {
    pub name: String,
    pub config: PlanConfig,
    allowed_extensions: Option<HashSet<String>>,
}

impl Plan {
    fn new(name: &str, config: &PlanConfig) -> Self {
        let allowed_extensions = config
            .allowed_extensions
            .as_ref()
            .map(|list| list.iter().map(|e| e.to_ascii_lowercase()).collect());
        Self {
            name: name.to_owned(),
            config: config.clone(),
            allowed_extensions,
        }
    }

    pub fn max_file_size(&self) -> u64 {
        self.config.max_file_size.0
    }

    /// Checks the (lower-case, possibly empty) last extension against the allowlist.
    pub fn check_extension(&self, extension: &str) -> Result<(), ApiError> {
        match &self.allowed_extensions {
            Some(allowed) if !allowed.contains(extension) => Err(ApiError::UnsupportedType {
                extension: extension.to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// Checks a size known in advance (a declared session size).
    pub fn check_size(&self, size: u64) -> Result<(), ApiError> {
        if size > self.max_file_size() {
            Err(ApiError::TooLarge {
                limit: self.max_file_size(),
            })
        } else {
            Ok(())
        }
    }

    pub fn max_files_per_request(&self, dialect_max: usize) -> usize {
        self.config
            .max_files_per_request
            .map_or(dialect_max, |max| max.min(dialect_max))
    }

    pub fn has_quota(&self) -> bool {
        self.config.daily_bytes.is_some() || self.config.daily_uploads.is_some()
    }

    /// (daily bytes, daily uploads) limits.
    pub fn quota_limits(&self) -> (Option<u64>, Option<u64>) {
        (self.config.daily_bytes.map(|b| b.0), self.config.daily_uploads)
    }
}

/// A tenant, compiled from config.
pub struct Tenant {
    pub name: String,
    pub plan: Arc<Plan>,
    /// The provider's name in config.
    pub provider: String,
    dialects: Vec<DialectGrant>,
    concurrency: Option<Arc<Concurrency>>,
}

/// A concurrency cap and the semaphore that enforces it.
struct Concurrency {
    cap: usize,
    semaphore: Arc<Semaphore>,
}

impl Concurrency {
    fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap,
            semaphore: Arc::new(Semaphore::new(cap)),
        })
    }
}

/// A key's governor bucket and the limit it was built for.
struct KeyLimiter {
    limit: RateLimitConfig,
    bucket: DefaultDirectRateLimiter,
}

impl KeyLimiter {
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

impl Tenant {
    pub fn allows(&self, dialect: DialectName) -> bool {
        self.dialects.iter().any(|grant| match grant {
            DialectGrant::All => true,
            DialectGrant::One(allowed) => *allowed == dialect,
        })
    }
}

struct KeyEntry {
    tenant: Arc<Tenant>,
    limiter: Option<Arc<KeyLimiter>>,
}

/// A request let in: the tenant, the policy snapshot it was admitted under (kept for the
/// whole request, so a reload does not change its plan or provider halfway), and the
/// concurrency permits it holds until dropped.
pub struct Admission {
    pub tenant: Arc<Tenant>,
    pub policy: Arc<Policy>,
    _permits: Vec<OwnedSemaphorePermit>,
}

impl Admission {
    /// The tenant's provider instance.
    pub fn provider(&self) -> Option<&Arc<Provider>> {
        self.policy.providers.get(&self.tenant.provider)
    }
}

/// One immutable policy snapshot.
pub struct Policy {
    pub config: Arc<Config>,
    pub providers: BTreeMap<String, Arc<Provider>>,
    tenants: BTreeMap<String, Arc<Tenant>>,
    keys: HashMap<KeyDigest, KeyEntry>,
    global_concurrency: Option<Arc<Concurrency>>,
}

impl Policy {
    /// Compiles a validated config with its instantiated providers. With `previous` (a
    /// reload), limiter state whose limits did not change carries over: a key keeps its
    /// governor bucket, a tenant and the daemon keep their concurrency semaphores (and so
    /// the permits uploads in flight hold), so a SIGHUP neither refills buckets nor lets a
    /// tenant past its cap.
    pub fn new(
        config: Config,
        providers: BTreeMap<String, Arc<Provider>>,
        previous: Option<&Policy>,
    ) -> Self {
        let plans: BTreeMap<String, Arc<Plan>> = config
            .plans
            .iter()
            .map(|(name, plan)| (name.clone(), Arc::new(Plan::new(name, plan))))
            .collect();
        let mut tenants = BTreeMap::new();
        let mut keys = HashMap::new();
        for (name, tenant_config) in &config.tenants {
            // Config validation guarantees the plan exists.
            let Some(plan) = plans.get(&tenant_config.plan) else {
                continue;
            };
            let cap = plan.config.max_concurrent_uploads;
            let concurrency = previous
                .and_then(|previous| previous.tenants.get(name))
                .and_then(|before| {
                    before
                        .concurrency
                        .as_ref()
                        .filter(|c| Some(c.cap) == cap)
                        .cloned()
                })
                .or_else(|| cap.map(Concurrency::new));
            let tenant = Arc::new(Tenant {
                name: name.clone(),
                plan: plan.clone(),
                provider: tenant_config.provider.clone(),
                dialects: tenant_config.dialects.clone(),
                concurrency,
            });
            for key in &tenant_config.keys {
                let Ok(digest) = KeyDigest::from_config(&key.0) else {
                    continue;
                };
                let limit = plan.config.rate_limit;
                let limiter = previous
                    .and_then(|previous| previous.keys.get(&digest))
                    .and_then(|before| {
                        before
                            .limiter
                            .as_ref()
                            .filter(|l| Some(l.limit) == limit)
                            .cloned()
                    })
                    .or_else(|| limit.and_then(KeyLimiter::new));
                keys.insert(
                    digest,
                    KeyEntry {
                        tenant: tenant.clone(),
                        limiter,
                    },
                );
            }
            tenants.insert(name.clone(), tenant);
        }
        let global = config.server.max_concurrent_uploads;
        let global_concurrency = previous
            .and_then(|previous| previous.global_concurrency.as_ref())
            .filter(|before| before.cap == global)
            .cloned()
            .or_else(|| (global > 0).then(|| Concurrency::new(global)));
        Self {
            config: Arc::new(config),
            providers,
            tenants,
            keys,
            global_concurrency,
        }
    }

    pub fn tenant(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.tenants.get(name)
    }

    /// The tenant a key belongs to, without applying anything (for logs).
    pub fn tenant_of_key(&self, key: &str) -> Option<&Arc<Tenant>> {
        self.keys.get(&KeyDigest::of(key)).map(|entry| &entry.tenant)
    }

    /// Authenticates `key` for `dialect` and applies the rate and concurrency limits.
    pub fn admit(self: &Arc<Self>, dialect: DialectName, key: &str) -> Result<Admission, ApiError> {
        let entry = self
            .keys
            .get(&KeyDigest::of(key))
            .ok_or(ApiError::InvalidCredentials)?;
        if !entry.tenant.allows(dialect) {
            return Err(ApiError::DialectNotAllowed);
        }
        if let Some(limiter) = &entry.limiter
            && let Err(not_until) = limiter.bucket.check()
        {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(ApiError::Throttled {
                retry_after_secs: ceil_secs(wait),
                why: Throttle::Rate,
            });
        }
        let mut permits = Vec::with_capacity(2);
        for semaphore in [&self.global_concurrency, &entry.tenant.concurrency]
            .into_iter()
            .flatten()
        {
            let permit =
                semaphore
                    .semaphore
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| ApiError::Throttled {
                        retry_after_secs: 1,
                        why: Throttle::Concurrency,
                    })?;
            permits.push(permit);
        }
        Ok(Admission {
            tenant: entry.tenant.clone(),
            policy: self.clone(),
            _permits: permits,
        })
    }
}

/// Whole seconds, rounded up, at least 1.
pub fn ceil_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

/// Days since the epoch (UTC), the unit of daily quotas, and seconds until the next day.
pub fn quota_day(now_ms: i64) -> (i64, u64) {
    let day_ms = 86_400_000;
    let day = now_ms.div_euclid(day_ms);
    let left = ((day + 1) * day_ms - now_ms) as u64;
    (day, left.div_ceil(1000).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_digests() {
        let plain = KeyDigest::from_config("demo-key").unwrap();
        let hashed =
            KeyDigest::from_config(&format!("sha256:{}", hex::encode(Sha256::digest(b"demo-key")))).unwrap();
        assert_eq!(plain, hashed);
        assert_eq!(plain, KeyDigest::of("demo-key"));
        assert!(KeyDigest::from_config("sha256:abc").is_err());
        assert!(KeyDigest::from_config(" ").is_err());
        assert!(KeyDigest::from_config("a b").is_err());
    }

    #[test]
    fn rounding_and_days() {
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_millis(1001)), 2);
        assert_eq!(ceil_secs(Duration::ZERO), 1);
        assert_eq!(quota_day(86_400_000 + 1000), (1, 86_399));
    }

    fn compiled(text: &str, previous: Option<&Policy>) -> Arc<Policy> {
        let config = Config::parse(text, std::path::Path::new("test.yaml")).expect("valid config");
        Arc::new(Policy::new(config, BTreeMap::new(), previous))
    }

    const LIMITED: &str = "server: { listen: 127.0.0.1:0 }\nplans:\n  p:\n    max_file_size: 1MiB\n    max_concurrent_uploads: 1\n    rate_limit: { requests_per_second: 0.001, burst: 2 }\nproviders:\n  disk: { plugin: local }\ntenants:\n  t: { plan: p, provider: disk, keys: [k] }\n";

    fn throttle(result: Result<Admission, ApiError>) -> Option<Throttle> {
        match result {
            Err(ApiError::Throttled { why, .. }) => Some(why),
            _ => None,
        }
    }

    #[test]
    fn a_reload_keeps_buckets_and_permits_whose_limits_did_not_change() {
        let before = compiled(LIMITED, None);
        drop(before.admit(DialectName::Dify, "k").unwrap());
        let in_flight = before.admit(DialectName::Dify, "k").unwrap();
        // Same limits: the bucket stays empty and the upload in flight still holds the
        // tenant's only slot.
        let after = compiled(LIMITED, Some(&before));
        assert_eq!(
            throttle(after.admit(DialectName::Dify, "k")),
            Some(Throttle::Rate)
        );
        let roomier = LIMITED.replace("burst: 2", "burst: 3");
        let after = compiled(&roomier, Some(&after));
        assert_eq!(
            throttle(after.admit(DialectName::Dify, "k")),
            Some(Throttle::Concurrency)
        );
        drop(in_flight);
        // A changed limit starts from a fresh bucket (and permits are given back).
        assert!(after.admit(DialectName::Dify, "k").is_ok());
    }

    #[test]
    fn extension_allowlist() {
        let config: PlanConfig =
            serde_norway::from_str("max_file_size: 10\nallowed_extensions: [PNG, txt, \"\"]").unwrap();
        let plan = Plan::new("p", &config);
        assert!(plan.check_extension("png").is_ok());
        assert!(plan.check_extension("").is_ok());
        assert_eq!(
            plan.check_extension("exe"),
            Err(ApiError::UnsupportedType {
                extension: "exe".into()
            })
        );
        assert!(plan.check_size(10).is_ok());
        assert_eq!(plan.check_size(11), Err(ApiError::TooLarge { limit: 10 }));
    }
}
