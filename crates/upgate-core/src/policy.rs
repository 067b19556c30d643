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

use crate::config::{Config, DialectGrant, PlanConfig};
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
    concurrency: Option<Arc<Semaphore>>,
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
    limiter: Option<DefaultDirectRateLimiter>,
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
    global_concurrency: Option<Arc<Semaphore>>,
}

impl Policy {
    /// Compiles a validated config with its instantiated providers.
    pub fn new(config: Config, providers: BTreeMap<String, Arc<Provider>>) -> Self {
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
            let tenant = Arc::new(Tenant {
                name: name.clone(),
                plan: plan.clone(),
                provider: tenant_config.provider.clone(),
                dialects: tenant_config.dialects.clone(),
                concurrency: plan
                    .config
                    .max_concurrent_uploads
                    .map(|n| Arc::new(Semaphore::new(n))),
            });
            for key in &tenant_config.keys {
                let Ok(digest) = KeyDigest::from_config(&key.0) else {
                    continue;
                };
                let limiter = plan.config.rate_limit.map(|limit| {
                    let period = Duration::from_secs_f64(1.0 / limit.requests_per_second);
                    let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
                    let quota = Quota::with_period(period)
                        .unwrap_or(Quota::per_second(burst))
                        .allow_burst(burst);
                    RateLimiter::direct(quota)
                });
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
        let global_concurrency = (global > 0).then(|| Arc::new(Semaphore::new(global)));
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
            && let Err(not_until) = limiter.check()
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
            let permit = semaphore
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
