//! Limits several nodes share through Redis (`server.limits.url`): per-key rates and
//! per-tenant concurrency; the daemon's own cap and the quotas stay with a [`LocalLimiter`]
//! (quotas are in the store, which PostgreSQL already shares).
//!
//! What flows through here: the hex of a key's digest (never the key) with its plan's rate,
//! and a tenant's name with its cap, sent to Redis as two Lua scripts (EVALSHA, loaded
//! again by themselves after a Redis restart) that read Redis's own clock (`TIME`), so the
//! nodes' clocks do not matter:
//! - a rate is GCRA, as `governor` counts it in this process: one theoretical arrival time
//!   per (key, limit) in `upgate:rate:<digest hex>:<period ns>:<burst>`, expiring when it
//!   would be in the past anyway (a changed limit starts afresh, as in `local.rs`);
//! - a tenant's uploads in progress are members of `upgate:slots:<tenant>`, a sorted set
//!   scored by lease expiry: a slot is taken if fewer than the cap are live, refreshed every
//!   [`LEASE_REFRESH`] while its upload runs, given back (`ZREM`) when its [`Slot`] drops,
//!   and gone by itself [`SLOT_LEASE`] after a node that held it died.
//!
//! Every Redis call is bounded ([`CONNECT_TIMEOUT`], [`COMMAND_TIMEOUT`]). When Redis cannot
//! be reached or fails, it is not asked again for [`RETRY_INTERVAL`], and each check
//! meanwhile is answered by this node's own limits (`fault_tolerant: true`) or refused with
//! [`LimitError::Unavailable`] (a 503): either way logged (at most every
//! [`WARNING_INTERVAL`], never with a key) and counted (`upgate_limits_fallback_total`,
//! `upgate_limits_unavailable_total`). The connection's I/O runs on a thread of its own,
//! as the PostgreSQL store's does, so no HTTP worker's runtime owns it.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue, Script};
use tokio::sync::oneshot;

use super::local::LocalLimiter;
use super::{LimitError, Limiter, Scope, Slot, Usage};
use crate::config::keys::KeyDigest;
use crate::config::{LimitsConfig, RateLimitConfig};
use crate::metrics;
use crate::store::{Store, StoreError};

#[cfg(test)]
mod tests;

/// Longest wait for a connection to Redis (TCP, and the handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait for one answer of Redis.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// How long Redis is left alone after it failed: checks meanwhile do not wait for it.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How long a slot lives in Redis without being refreshed: the longest a dead node's
/// uploads keep counting against their tenant.
pub(crate) const SLOT_LEASE: Duration = Duration::from_secs(30);
/// How often a held slot's lease is renewed.
const LEASE_REFRESH: Duration = Duration::from_secs(10);
/// At most one warning about an unreachable Redis this often.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// Every key upgate writes starts with this.
const PREFIX: &str = "upgate";

/// GCRA, as governor's (`Gcra::test_and_update`): the emission interval `t`, the tolerance
/// `tau = t * (burst - 1)`; a request at `now` passes unless `now < tat - tau`, and moves
/// the theoretical arrival time to `max(tat, now) + t`. Times in microseconds of Redis's
/// clock (`%.0f`: Lua's own number format would round them). Returns {1, 0} or {0, wait µs}.
const GCRA: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local t = tonumber(ARGV[1])
local tau = t * (tonumber(ARGV[2]) - 1)
local tat = tonumber(redis.call('GET', KEYS[1])) or now
local earliest = tat - tau
if now < earliest then
  return {0, math.min(math.ceil(earliest - now), 1e15)}
end
local new_tat = math.max(tat, now) + t
local ttl = math.min(math.max(math.ceil((new_tat - now) / 1000), 1), 1e12)
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%.0f', ttl))
return {1, 0}
";

/// Takes a slot: drops the expired ones, then adds `ARGV[2]` with a lease of `ARGV[3]` ms if
/// fewer than `ARGV[1]` are live. The set itself expires a lease after its last change.
const ACQUIRE: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + lease), ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease)
return 1
";

/// Renews slot `ARGV[1]`'s lease (`ARGV[2]` ms), adding it back if Redis lost it (a
/// restart without persistence): the upload is still running.
const REFRESH: &str = r"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%.0f', now + lease), ARGV[1])
redis.call('PEXPIRE', KEYS[1], lease)
return 1
";

static GCRA_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(GCRA));
static ACQUIRE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE));
static REFRESH_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(REFRESH));

/// One call to Redis: a script on one key (EVALSHA, loaded first if Redis lacks it), or a
/// command.
enum Call {
    Script {
        script: &'static Script,
        key: String,
        args: Vec<String>,
    },
    Command {
        name: &'static str,
        args: Vec<String>,
    },
}

impl Call {
    async fn send<T: FromRedisValue>(&self, mut connection: MultiplexedConnection) -> redis::RedisResult<T> {
        match self {
            Self::Script { script, key, args } => {
                let mut invocation = script.key(key);
                for arg in args {
                    invocation.arg(arg);
                }
                invocation.invoke_async(&mut connection).await
            }
            Self::Command { name, args } => {
                let mut command = redis::cmd(name);
                for arg in args {
                    command.arg(arg);
                }
                command.query_async(&mut connection).await
            }
        }
    }
}

/// Why Redis did not answer a check.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RedisLimitError {
    #[error("Redis failed a moment ago (asked again after {} s)", RETRY_INTERVAL.as_secs())]
    Resting,
    #[error("cannot connect to Redis: {0}")]
    Connect(redis::RedisError),
    #[error("no connection to Redis within {} s", CONNECT_TIMEOUT.as_secs())]
    ConnectTimeout,
    #[error("no answer from Redis within {} s", COMMAND_TIMEOUT.as_secs())]
    Timeout,
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected answer from Redis: {0}")]
    Answer(String),
    #[error("the Redis driver thread has stopped")]
    Stopped,
    #[error("cannot read ca_file {path}: {message}")]
    CaFile { path: String, message: String },
}

impl RedisLimitError {
    /// Whether the command was sent, so Redis may have run it though no answer came.
    fn maybe_ran(&self) -> bool {
        matches!(self, Self::Timeout | Self::Redis(_))
    }
}

/// The connection to Redis and what is known of its health. Shared with the tasks that
/// keep held slots' leases.
struct Shared {
    client: redis::Client,
    /// The URL without its password, for logs.
    shown: String,
    connection: Mutex<Option<MultiplexedConnection>>,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    /// Until when Redis is not asked again, after a failure.
    resting_until: Mutex<Option<Instant>>,
    /// Whether the last call failed (so the next success is logged).
    failing: Mutex<bool>,
    /// When the last warning was logged, and how many failures went unlogged since.
    warned: Mutex<(Option<Instant>, u64)>,
    /// The runtime the connection's I/O and the lease tasks run on.
    driver: tokio::runtime::Handle,
    /// Dropped with the last handle: the driver thread ends.
    _stop: oneshot::Sender<()>,
}

/// Rates and tenant concurrency in Redis; the daemon's cap and quotas (and, when Redis is
/// unreachable and `fault_tolerant`, everything) in `local`.
pub(crate) struct RedisLimiter {
    shared: Arc<Shared>,
    local: LocalLimiter,
    fault_tolerant: bool,
}

impl RedisLimiter {
    /// A limiter on the Redis of `config` (connected at the first check, so a node starts
    /// while Redis is down), with quotas in `store`.
    pub(crate) fn new(config: &LimitsConfig, store: Arc<dyn Store>) -> Result<Self, RedisLimitError> {
        let client = client_of(config)?;
        let (driver, stop) = crate::driver::start("upgate-redis").map_err(|_| RedisLimitError::Stopped)?;
        metrics::prime_limits();
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                shown: config.url.to_string(),
                connection: Mutex::default(),
                connecting: tokio::sync::Mutex::default(),
                resting_until: Mutex::default(),
                failing: Mutex::default(),
                warned: Mutex::default(),
                driver,
                _stop: stop,
            }),
            local: LocalLimiter::new(store),
            fault_tolerant: config.fault_tolerant,
        })
    }

    /// What `check-config` asks: Redis at `config.url` answers `PING`.
    pub(crate) async fn probe(config: &LimitsConfig) -> Result<(), RedisLimitError> {
        let client = client_of(config)?;
        let probing = async {
            let mut connection = client
                .get_multiplexed_async_connection_with_config(&connection_config())
                .await
                .map_err(RedisLimitError::Connect)?;
            let answer: String = redis::cmd("PING").query_async(&mut connection).await?;
            if answer == "PONG" {
                Ok(())
            } else {
                Err(RedisLimitError::Answer(answer))
            }
        };
        tokio::time::timeout(CONNECT_TIMEOUT + COMMAND_TIMEOUT, probing)
            .await
            .unwrap_or(Err(RedisLimitError::Timeout))
    }

    /// Redis could not answer a check of `limit`: this node's own verdict (`fault_tolerant`)
    /// or [`LimitError::Unavailable`]; logged and counted either way.
    fn unreachable<T>(
        &self,
        limit: &'static str,
        error: &RedisLimitError,
        local: impl FnOnce() -> Result<T, LimitError>,
    ) -> Result<T, LimitError> {
        metrics::limits_unreachable(limit, self.fault_tolerant);
        self.shared.warn(error, self.fault_tolerant);
        if self.fault_tolerant {
            local()
        } else {
            Err(LimitError::Unavailable(error.to_string()))
        }
    }
}

/// The driver's client for `config`: with `ca_file` (a `rediss://` URL, checked when the config
/// was read), that file's certificates are the roots the server's must chain to.
fn client_of(config: &LimitsConfig) -> Result<redis::Client, RedisLimitError> {
    let Some(ca_file) = &config.ca_file else {
        return Ok(redis::Client::open(config.url.expose())?);
    };
    let ca_error = |message: String| RedisLimitError::CaFile {
        path: ca_file.display().to_string(),
        message,
    };
    let pem = std::fs::read(ca_file).map_err(|error| ca_error(error.to_string()))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(ca_error("no PEM certificate in it".into()));
    }
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    };
    Ok(redis::Client::build_with_tls(config.url.expose(), certificates)?)
}

fn connection_config() -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
}

/// The Redis key of `key`'s counter under `limit`, and the emission interval in µs; `None`
/// for limits config validation refuses (as `local.rs`'s buckets).
fn rate_key(key: &KeyDigest, limit: RateLimitConfig) -> Option<(String, f64)> {
    let period = Duration::try_from_secs_f64(1.0 / limit.requests_per_second).ok()?;
    if period.is_zero() || limit.burst == 0 {
        return None;
    }
    let nanos = period.as_nanos();
    let name = format!("{PREFIX}:rate:{}:{nanos}:{}", key.hex(), limit.burst);
    Some((name, nanos as f64 / 1000.0))
}

fn slots_key(tenant: &str) -> String {
    format!("{PREFIX}:slots:{tenant}")
}

impl Shared {
    /// The connection, made if there is none (one attempt at a time), unless Redis is
    /// resting after a failure; `true` with a connection made for this call.
    async fn connection(&self) -> Result<(MultiplexedConnection, bool), RedisLimitError> {
        if let Some(connection) = self.current() {
            return Ok((connection, false));
        }
        self.check_resting()?;
        let _one = tokio::time::timeout(CONNECT_TIMEOUT, self.connecting.lock())
            .await
            .map_err(|_| RedisLimitError::ConnectTimeout)?;
        if let Some(connection) = self.current() {
            return Ok((connection, false));
        }
        self.check_resting()?;
        let client = self.client.clone();
        let connecting = self.driver.spawn(async move {
            client
                .get_multiplexed_async_connection_with_config(&connection_config())
                .await
        });
        let connected = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(Ok(connection))) => Ok(connection),
            Ok(Ok(Err(error))) => Err(RedisLimitError::Connect(error)),
            Ok(Err(_)) => Err(RedisLimitError::Stopped),
            Err(_) => Err(RedisLimitError::ConnectTimeout),
        };
        let connection = connected?;
        *lock(&self.connection) = Some(connection.clone());
        Ok((connection, true))
    }

    fn current(&self) -> Option<MultiplexedConnection> {
        lock(&self.connection).clone()
    }

    fn check_resting(&self) -> Result<(), RedisLimitError> {
        match *lock(&self.resting_until) {
            Some(until) if Instant::now() < until => Err(RedisLimitError::Resting),
            _ => Ok(()),
        }
    }

    /// Redis failed: drop the connection (the next call makes a new one) and leave Redis
    /// alone for a moment.
    fn rest(&self) {
        *lock(&self.connection) = None;
        *lock(&self.resting_until) = Some(Instant::now() + RETRY_INTERVAL);
        *lock(&self.failing) = true;
    }

    /// Sends `call` within [`COMMAND_TIMEOUT`] (connecting first if needed); a failure rests
    /// Redis. A connection Redis closed since its last use (a restart) is replaced once, at
    /// once.
    async fn call<T: FromRedisValue + Send>(&self, call: Call) -> Result<T, RedisLimitError> {
        let answered = self.connect_and_send(&call).await;
        match &answered {
            Ok(_) => {
                let recovered = std::mem::replace(&mut *lock(&self.failing), false);
                if recovered {
                    tracing::info!(redis = %self.shown, "Redis answers again: limits are shared again");
                }
            }
            // Resting already: the rest does not grow while checks keep coming.
            Err(RedisLimitError::Resting) => {}
            Err(_) => self.rest(),
        }
        answered
    }

    async fn connect_and_send<T: FromRedisValue + Send>(&self, call: &Call) -> Result<T, RedisLimitError> {
        let (connection, fresh) = self.connection().await?;
        let answered = self.send(call, connection).await;
        if !fresh && matches!(&answered, Err(RedisLimitError::Redis(error)) if is_lost(error)) {
            *lock(&self.connection) = None;
            let (connection, _) = self.connection().await?;
            return self.send(call, connection).await;
        }
        answered
    }

    async fn send<T: FromRedisValue + Send>(
        &self,
        call: &Call,
        connection: MultiplexedConnection,
    ) -> Result<T, RedisLimitError> {
        match tokio::time::timeout(COMMAND_TIMEOUT, call.send(connection)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(error)) => Err(RedisLimitError::Redis(error)),
            Err(_) => Err(RedisLimitError::Timeout),
        }
    }

    /// One request of `key` under `limit`, counted in Redis.
    async fn take(
        &self,
        key: &KeyDigest,
        limit: RateLimitConfig,
    ) -> Result<Result<(), LimitError>, RedisLimitError> {
        let Some((name, interval_us)) = rate_key(key, limit) else {
            return Ok(Ok(()));
        };
        let args = vec![interval_us.to_string(), limit.burst.to_string()];
        let (passed, wait_us): (i64, i64) = self
            .call(Call::Script {
                script: &GCRA_SCRIPT,
                key: name,
                args,
            })
            .await?;
        Ok(if passed == 1 {
            Ok(())
        } else {
            // A day at most, whatever Redis answered (its clock, a bad script reply).
            Err(LimitError::Rate(Duration::from_micros(
                u64::try_from(wait_us).unwrap_or(0).min(86_400_000_000),
            )))
        })
    }

    /// Takes slot `id` of `tenant` among `cap` for `lease`: whether it was free.
    async fn acquire(
        &self,
        tenant: &str,
        cap: usize,
        id: &str,
        lease: Duration,
    ) -> Result<bool, RedisLimitError> {
        let args = vec![cap.to_string(), id.to_owned(), lease.as_millis().to_string()];
        let taken: i64 = self
            .call(Call::Script {
                script: &ACQUIRE_SCRIPT,
                key: slots_key(tenant),
                args,
            })
            .await?;
        Ok(taken == 1)
    }

    async fn refresh(&self, name: &str, id: &str) -> Result<(), RedisLimitError> {
        let args = vec![id.to_owned(), SLOT_LEASE.as_millis().to_string()];
        let _: i64 = self
            .call(Call::Script {
                script: &REFRESH_SCRIPT,
                key: name.to_owned(),
                args,
            })
            .await?;
        Ok(())
    }

    async fn release(&self, name: &str, id: &str) -> Result<(), RedisLimitError> {
        let _: i64 = self
            .call(Call::Command {
                name: "ZREM",
                args: vec![name.to_owned(), id.to_owned()],
            })
            .await?;
        Ok(())
    }

    /// Gives slot `id` back, trying again for a few seconds if Redis is failing (past
    /// that, its lease runs out by itself).
    async fn release_soon(&self, name: &str, id: &str) {
        for _ in 0..3 {
            if self.release(name, id).await.is_ok() {
                return;
            }
            tokio::time::sleep(RETRY_INTERVAL).await;
        }
    }

    /// Logs that Redis could not answer, at most every [`WARNING_INTERVAL`].
    fn warn(&self, error: &RedisLimitError, fault_tolerant: bool) {
        let mut warned = lock(&self.warned);
        let due = warned.0.is_none_or(|last| last.elapsed() >= WARNING_INTERVAL);
        if !due {
            warned.1 += 1;
            return;
        }
        let unlogged = std::mem::take(&mut warned.1);
        warned.0 = Some(Instant::now());
        drop(warned);
        if fault_tolerant {
            tracing::warn!(
                redis = %self.shown, %error, unlogged,
                "Redis unreachable: counting rate limits and tenant concurrency on this node's own (fault_tolerant)"
            );
        } else {
            tracing::warn!(
                redis = %self.shown, %error, unlogged,
                "Redis unreachable: refusing requests with 503 (fault_tolerant: false)"
            );
        }
    }
}

/// Whether `error` says the connection was gone already (rather than that a command failed
/// or got no answer in time: trying again would wait twice).
fn is_lost(error: &redis::RedisError) -> bool {
    (error.is_connection_dropped() || error.is_io_error() || error.is_unrecoverable_error())
        && !error.is_timeout()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// A tenant slot held in Redis. Its lease is renewed by a task on the driver runtime until
/// this is dropped; then the task gives the slot back.
struct SharedSlot {
    _held: oneshot::Sender<()>,
}

impl SharedSlot {
    fn hold(shared: Arc<Shared>, name: String, id: String) -> Self {
        let (held, mut dropped) = oneshot::channel::<()>();
        let driver = shared.driver.clone();
        driver.spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut dropped => break,
                    () = tokio::time::sleep(LEASE_REFRESH) => {
                        if let Err(error) = shared.refresh(&name, &id).await {
                            tracing::debug!(%error, "cannot renew a tenant slot's lease in Redis");
                        }
                    }
                }
            }
            shared.release_soon(&name, &id).await;
        });
        Self { _held: held }
    }
}

impl Limiter for RedisLimiter {
    fn unready(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(async move {
            if self.fault_tolerant {
                // Checks fall back to this node's own limits: requests are served.
                return None;
            }
            let ping = Call::Command {
                name: "PING",
                args: Vec::new(),
            };
            match self.shared.call::<String>(ping).await {
                Ok(_) => None,
                Err(error) => Some(format!("limits: Redis at {}: {error}", self.shared.shown)),
            }
        })
    }

    fn take(&self, key: KeyDigest, limit: RateLimitConfig) -> BoxFuture<'_, Result<(), LimitError>> {
        Box::pin(async move {
            match self.shared.take(&key, limit).await {
                Ok(verdict) => verdict,
                Err(error) => self.unreachable("rate", &error, || self.local.take_now(key, limit)),
            }
        })
    }

    fn acquire(&self, scope: Scope, cap: usize) -> BoxFuture<'_, Result<Slot, LimitError>> {
        Box::pin(async move {
            let Scope::Tenant(tenant) = &scope else {
                // `server.max_concurrent_uploads` is this node's own by design.
                return self.local.acquire_now(scope, cap);
            };
            let id = uuid::Uuid::new_v4().simple().to_string();
            match self.shared.acquire(tenant, cap, &id, SLOT_LEASE).await {
                Ok(true) => {
                    Ok(Box::new(SharedSlot::hold(self.shared.clone(), slots_key(tenant), id)) as Slot)
                }
                Ok(false) => Err(LimitError::Busy),
                Err(error) => {
                    if error.maybe_ran() {
                        // The script may have run before the answer was lost: give that
                        // slot back when Redis answers (or let its lease run out).
                        let shared = self.shared.clone();
                        let name = slots_key(tenant);
                        self.shared.driver.spawn(async move {
                            tokio::time::sleep(RETRY_INTERVAL).await;
                            shared.release_soon(&name, &id).await;
                        });
                    }
                    self.unreachable("concurrency", &error, || {
                        self.local.acquire_now(scope.clone(), cap)
                    })
                }
            }
        })
    }

    fn usage(&self, tenant: String, day: i64) -> BoxFuture<'_, Result<Usage, StoreError>> {
        self.local.usage(tenant, day)
    }

    fn try_add_usage(
        &self,
        tenant: String,
        day: i64,
        added: Usage,
        limits: (Option<u64>, Option<u64>),
    ) -> BoxFuture<'_, Result<bool, StoreError>> {
        self.local.try_add_usage(tenant, day, added, limits)
    }

    fn refund_usage(&self, tenant: String, day: i64, refund: Usage) -> BoxFuture<'_, Result<(), StoreError>> {
        self.local.refund_usage(tenant, day, refund)
    }
}
