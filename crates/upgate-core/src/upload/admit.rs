//! Admission: the checks a request passes before its body is read.
//!
//! What flows through here: the dialect and the key a dialect's edge extracted. In order:
//! the key's tenant and its dialect grant ([`Policy::authenticate`]), the key's rate, the
//! daemon's and the tenant's concurrency caps (slots held until the [`Admission`] drops), and
//! room in the day's quota. The disk floor is not checked here: it refuses what adds bytes
//! ([`Gateway::check_disk_floor`], at each step that writes), never a `DELETE` or a `HEAD`. Out comes an [`Admission`], or the
//! [`ApiError`] that refused the request.

use std::sync::Arc;

use crate::error::{ApiError, Throttle};
use crate::limits::{Scope, Slot};
use crate::plugins::Provider;
use crate::policy::{Policy, Tenant, quota_day};
use crate::vocab::{DialectName, now_ms};

use super::Gateway;

/// A request let in: its dialect, its tenant, the policy snapshot it was admitted under
/// (kept for the whole request, so a reload does not change its plan or provider halfway),
/// and the concurrency slots it holds until dropped.
pub(crate) struct Admission {
    pub(crate) dialect: DialectName,
    pub(crate) tenant: Arc<Tenant>,
    pub(crate) policy: Arc<Policy>,
    _slots: Vec<Slot>,
}

impl Admission {
    /// The tenant's provider instance.
    pub(crate) fn provider(&self) -> Option<&Arc<Provider>> {
        self.policy.providers.get(&self.tenant.provider)
    }
}

/// What an admitted request does, which decides the limits it passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Work {
    /// Adds bytes or an upload: the concurrency caps and the day's quota apply.
    Upload,
    /// Looks an upload up or removes it (a tus `HEAD` or `DELETE`, a Kore XO `DELETE`): the
    /// key, its grant and its rate only. A tenant at its cap or quota can still resume and
    /// clean up.
    Lookup,
}

impl Gateway {
    /// Refuses a step that adds bytes while `data_dir` is below `disk_free_floor` (507).
    pub(crate) fn check_disk_floor(&self) -> Result<(), ApiError> {
        if self.below_disk_floor() {
            Err(ApiError::InsufficientStorage)
        } else {
            Ok(())
        }
    }

    /// Authenticates `key` for `dialect` and applies the limits that do not need the body and
    /// that `work` must pass.
    pub(crate) async fn admit(
        &self,
        dialect: DialectName,
        key: &str,
        work: Work,
    ) -> Result<Admission, ApiError> {
        let policy = self.policy();
        let (digest, tenant) = policy.authenticate(dialect, key)?;
        let tenant = tenant.clone();
        let plan = &tenant.plan;
        if let Some(limit) = plan.config.rate_limit {
            self.limiter.take(digest, limit).await?;
        }
        let admission = Admission {
            dialect,
            tenant,
            policy,
            _slots: Vec::new(),
        };
        match work {
            Work::Lookup => Ok(admission),
            Work::Upload => self.for_upload(admission).await,
        }
    }

    /// Makes an admission for [`Work::Lookup`] one for [`Work::Upload`]: the concurrency caps
    /// and the day's quota (its key and rate were checked already, and are not again).
    pub(crate) async fn for_upload(&self, mut admission: Admission) -> Result<Admission, ApiError> {
        let (policy, tenant) = (&admission.policy, &admission.tenant);
        let plan = &tenant.plan;
        let mut slots = Vec::with_capacity(2);
        let global = policy.config.server.max_concurrent_uploads;
        if global > 0 {
            slots.push(self.limiter.acquire(Scope::Daemon, global).await?);
        }
        if let Some(cap) = plan.config.max_concurrent_uploads {
            let scope = Scope::Tenant(tenant.name.clone());
            slots.push(self.limiter.acquire(scope, cap).await?);
        }
        if plan.has_quota() {
            let (day, retry_after_secs) = quota_day(now_ms());
            let (bytes, uploads) = self.limiter.usage(tenant.name.clone(), day).await?;
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
        admission._slots.extend(slots);
        Ok(admission)
    }
}
