//! Policy: who is calling, and what their plan lets them do.
//!
//! What flows through here: the key a dialect extracted from the request, hashed and looked
//! up among the configured keys' digests (an unknown key never reaches a limiter, so
//! limiter memory is bounded by the config); the tenant's dialect grants; its plan's size
//! limit, extension allowlist, rate, concurrency and daily quotas (counted by
//! [`crate::limits`]). A [`Policy`] is an immutable snapshot compiled from a validated
//! config: reload swaps in a new one, and requests in flight keep the one they started with.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::config::{Config, DialectGrant, KeyDigest, PlanConfig};
use crate::error::ApiError;
use crate::plugins::Provider;
use crate::vocab::DialectName;

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

    /// Unfinished sessions a tenant of this plan may hold at once.
    pub fn max_open_sessions(&self) -> u64 {
        self.config
            .max_open_sessions
            .unwrap_or(crate::config::DEFAULT_MAX_OPEN_SESSIONS)
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
}

impl Tenant {
    pub fn allows(&self, dialect: DialectName) -> bool {
        self.dialects.iter().any(|grant| match grant {
            DialectGrant::All => true,
            DialectGrant::One(allowed) => *allowed == dialect,
        })
    }
}

/// One immutable policy snapshot.
pub struct Policy {
    pub config: Arc<Config>,
    pub providers: BTreeMap<String, Arc<Provider>>,
    tenants: BTreeMap<String, Arc<Tenant>>,
    keys: HashMap<KeyDigest, Arc<Tenant>>,
}

impl Policy {
    /// Compiles a validated config (keys already digests, plans cross-checked) with its
    /// instantiated providers.
    pub fn new(config: Config, providers: BTreeMap<String, Arc<Provider>>) -> Self {
        let plans: BTreeMap<String, Arc<Plan>> = config
            .plans
            .iter()
            .map(|(name, plan)| (name.clone(), Arc::new(Plan::new(name, plan))))
            .collect();
        let mut tenants = BTreeMap::new();
        let mut keys = HashMap::new();
        for (name, tenant_config) in &config.tenants {
            let tenant = Arc::new(Tenant {
                name: name.clone(),
                // Config validation refuses a tenant whose plan does not exist.
                plan: plans[&tenant_config.plan].clone(),
                provider: tenant_config.provider.clone(),
                dialects: tenant_config.dialects.clone(),
            });
            for key in &tenant_config.keys {
                keys.insert(key.0, tenant.clone());
            }
            tenants.insert(name.clone(), tenant);
        }
        Self {
            config: Arc::new(config),
            providers,
            tenants,
            keys,
        }
    }

    pub fn tenant(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.tenants.get(name)
    }

    /// The tenant a key belongs to, without applying anything (for logs).
    pub fn tenant_of_key(&self, key: &str) -> Option<&Arc<Tenant>> {
        self.keys.get(&KeyDigest::of(key))
    }

    /// Authenticates `key` for `dialect`: its digest and its tenant, or why not.
    pub fn authenticate(
        &self,
        dialect: DialectName,
        key: &str,
    ) -> Result<(KeyDigest, &Arc<Tenant>), ApiError> {
        let digest = KeyDigest::of(key);
        let tenant = self.keys.get(&digest).ok_or(ApiError::InvalidCredentials)?;
        if !tenant.allows(dialect) {
            return Err(ApiError::DialectNotAllowed);
        }
        Ok((digest, tenant))
    }
}

/// Days since the epoch (UTC), the unit of daily quotas, and seconds until the next day.
pub(crate) fn quota_day(now_ms: i64) -> (i64, u64) {
    let day_ms = 86_400_000;
    let day = now_ms.div_euclid(day_ms);
    let left = ((day + 1) * day_ms - now_ms) as u64;
    (day, left.div_ceil(1000).max(1))
}

#[cfg(test)]
mod tests;
