//! Tests of the Redis limiter on a real Redis (upgate_e2e::redis): the GCRA script against
//! governor's verdicts, slots shared by two limiters (two nodes), given back and expiring,
//! the daemon's cap per node, and Redis stopped or hung: each node's own limits or
//! `Unavailable`, within the bounds; a Redis whose replies declare a billion elements.

use std::sync::Arc;
use std::time::{Duration, Instant};

use upgate_e2e::redis::RedisServer;

use super::*;
use crate::config::{Durability, RedisUrl};
use crate::store::sqlite::SqliteStore;

struct Node {
    limiter: RedisLimiter,
    _dir: tempfile::TempDir,
}

fn node(redis: &RedisServer, fault_tolerant: bool) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), Durability::ProcessCrash).unwrap());
    let config = LimitsConfig {
        url: RedisUrl::parse(&redis.url()).unwrap(),
        fault_tolerant,
        ca_file: None,
    };
    Node {
        limiter: RedisLimiter::new(&config, store.clone()).unwrap(),
        _dir: dir,
    }
}

fn local() -> (LocalLimiter, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), Durability::ProcessCrash).unwrap());
    (LocalLimiter::new(store), dir)
}

fn limit(requests_per_second: f64, burst: u32) -> RateLimitConfig {
    RateLimitConfig {
        requests_per_second,
        burst,
    }
}

fn wait_of(verdict: Result<(), LimitError>) -> Duration {
    match verdict {
        Err(LimitError::Rate(wait)) => wait,
        other => panic!("expected a wait, got {other:?}"),
    }
}

#[tokio::test]
async fn the_script_admits_what_governor_admits_and_waits_as_long() {
    let redis = RedisServer::start();
    let shared = node(&redis, true);
    let (governor, _dir) = local();
    for (n, (rate, burst)) in [(0.001, 1), (0.001, 3), (0.5, 4), (1.0 / 86_400.0, 2)]
        .into_iter()
        .enumerate()
    {
        let key = KeyDigest::of(&format!("key-{n}"));
        let limit = limit(rate, burst);
        for request in 0..burst {
            assert_eq!(
                shared.limiter.take(key, limit).await,
                Ok(()),
                "{rate}/s, burst {burst}: request {request}"
            );
            assert_eq!(governor.take(key, limit).await, Ok(()));
        }
        let (redis_wait, governor_wait) = (
            wait_of(shared.limiter.take(key, limit).await),
            wait_of(governor.take(key, limit).await),
        );
        let apart = redis_wait.abs_diff(governor_wait);
        assert!(
            apart < Duration::from_millis(100),
            "{rate}/s, burst {burst}: Redis says {redis_wait:?}, governor {governor_wait:?}"
        );
        // A refused request does not count: the wait does not grow.
        let again = wait_of(shared.limiter.take(key, limit).await);
        assert!(again <= redis_wait, "{again:?} > {redis_wait:?}");
    }
    // The counters are named by the digest's hex, with the limit, and expire.
    let keys = redis.cli(&["KEYS", "upgate:rate:*"]);
    let digest = KeyDigest::of("key-1").hex();
    assert!(
        keys.lines()
            .any(|name| name == format!("upgate:rate:{digest}:1000000000000:3")),
        "{keys}"
    );
    for name in keys.lines() {
        let ttl: i64 = redis.cli(&["PTTL", name]).parse().unwrap();
        assert!(ttl > 0, "{name}: PTTL {ttl}");
    }
}

#[tokio::test]
async fn a_bucket_refills_at_its_rate_and_a_changed_limit_starts_afresh() {
    let redis = RedisServer::start();
    let shared = node(&redis, true);
    let key = KeyDigest::of("refill");
    let fast = limit(20.0, 2);
    shared.limiter.take(key, fast).await.unwrap();
    shared.limiter.take(key, fast).await.unwrap();
    let wait = wait_of(shared.limiter.take(key, fast).await);
    assert!(wait <= Duration::from_millis(50), "{wait:?}");
    tokio::time::sleep(wait + Duration::from_millis(5)).await;
    assert_eq!(shared.limiter.take(key, fast).await, Ok(()));
    // A reload to another limit: a fresh bucket.
    assert_eq!(shared.limiter.take(key, limit(20.0, 3)).await, Ok(()));
}

#[tokio::test]
async fn tenant_slots_are_shared_given_back_and_expire_with_their_node() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, true), node(&redis, true));
    let tenant = || Scope::Tenant("t".into());
    let first = a.limiter.acquire(tenant(), 2).await.unwrap();
    let second = b.limiter.acquire(tenant(), 2).await.unwrap();
    assert_eq!(a.limiter.acquire(tenant(), 2).await.err(), Some(LimitError::Busy));
    assert_eq!(b.limiter.acquire(tenant(), 2).await.err(), Some(LimitError::Busy));
    assert_eq!(redis.cli(&["ZCARD", "upgate:slots:t"]), "2");
    // Given back when dropped (by a task: soon, not at once).
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    let third = loop {
        match b.limiter.acquire(tenant(), 2).await {
            Ok(slot) => break slot,
            Err(LimitError::Busy) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("{error:?}"),
        }
    };
    drop((second, third));

    // A node that dies holding a slot: nothing renews its lease, and it runs out.
    let lease = Duration::from_millis(300);
    assert!(
        a.limiter
            .shared
            .acquire("dead", 1, "slot-of-a-dead-node", lease)
            .await
            .unwrap()
    );
    assert_eq!(
        b.limiter.acquire(Scope::Tenant("dead".into()), 1).await.err(),
        Some(LimitError::Busy)
    );
    tokio::time::sleep(lease + Duration::from_millis(50)).await;
    let revived = b.limiter.acquire(Scope::Tenant("dead".into()), 1).await;
    assert!(revived.is_ok(), "{:?}", revived.err());

    // The daemon's cap is each node's own.
    let held = a.limiter.acquire(Scope::Daemon, 1).await.unwrap();
    assert_eq!(
        a.limiter.acquire(Scope::Daemon, 1).await.err(),
        Some(LimitError::Busy)
    );
    assert!(b.limiter.acquire(Scope::Daemon, 1).await.is_ok());
    drop(held);
    assert_eq!(redis.cli(&["EXISTS", "upgate:slots:daemon"]), "0");
}

#[tokio::test]
async fn a_held_slots_lease_is_renewed_and_comes_back_after_a_redis_restart() {
    let mut redis = RedisServer::start();
    let a = node(&redis, true);
    let held = a.limiter.acquire(Scope::Tenant("long".into()), 1).await.unwrap();
    let score = |redis: &RedisServer| -> i64 {
        let members = redis.cli(&["ZRANGE", "upgate:slots:long", "0", "-1", "WITHSCORES"]);
        members
            .lines()
            .nth(1)
            .unwrap_or_else(|| panic!("no slot: {members}"))
            .parse()
            .unwrap()
    };
    let first = score(&redis);
    // Redis restarted empty: the next renewal puts the slot back.
    redis.stop();
    redis.start_again();
    assert_eq!(redis.cli(&["ZCARD", "upgate:slots:long"]), "0");
    tokio::time::sleep(LEASE_REFRESH + Duration::from_secs(1)).await;
    let renewed = score(&redis);
    assert!(renewed > first, "{renewed} after {first}");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis.cli(&["ZCARD", "upgate:slots:long"]) != "0" {
        assert!(Instant::now() < deadline, "the slot was not given back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn redis_stopped_or_hung_is_each_nodes_own_limits_or_unavailable_within_bounds() {
    let mut redis = RedisServer::start();
    let tolerant = node(&redis, true);
    let strict = node(&redis, false);
    let key = KeyDigest::of("outage");
    let burst_of_two = limit(0.001, 2);
    let tenant = || Scope::Tenant("outage".into());
    assert_eq!(tolerant.limiter.take(key, burst_of_two).await, Ok(()));
    assert_eq!(strict.limiter.take(key, burst_of_two).await, Ok(()));

    redis.stop();
    let started = Instant::now();
    // The tolerant node counts on its own bucket, full: two pass, the third waits.
    assert_eq!(tolerant.limiter.take(key, burst_of_two).await, Ok(()));
    assert_eq!(tolerant.limiter.take(key, burst_of_two).await, Ok(()));
    wait_of(tolerant.limiter.take(key, burst_of_two).await);
    let slot = tolerant.limiter.acquire(tenant(), 1).await.unwrap();
    assert_eq!(
        tolerant.limiter.acquire(tenant(), 1).await.err(),
        Some(LimitError::Busy)
    );
    drop(slot);
    // The strict one refuses.
    assert!(matches!(
        strict.limiter.take(key, burst_of_two).await,
        Err(LimitError::Unavailable(_))
    ));
    assert!(matches!(
        strict.limiter.acquire(tenant(), 1).await,
        Err(LimitError::Unavailable(_))
    ));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );

    // Back: asked again once it has rested.
    redis.start_again();
    tokio::time::sleep(RETRY_INTERVAL + Duration::from_millis(100)).await;
    assert_eq!(strict.limiter.take(key, burst_of_two).await, Ok(()));
    assert_eq!(tolerant.limiter.take(key, burst_of_two).await, Ok(()));
    assert_eq!(redis.cli(&["KEYS", "upgate:rate:*"]).lines().count(), 1);

    // Hung (connections open, nothing answers): each check within the command timeout.
    redis.freeze();
    let started = Instant::now();
    let verdict = strict.limiter.take(key, burst_of_two).await;
    let took = started.elapsed();
    let fallback = tolerant.limiter.acquire(tenant(), 1).await;
    let both = started.elapsed();
    redis.thaw();
    assert!(matches!(verdict, Err(LimitError::Unavailable(_))), "{verdict:?}");
    assert!(took < COMMAND_TIMEOUT + Duration::from_millis(500), "{took:?}");
    assert!(fallback.is_ok(), "{:?}", fallback.err());
    assert!(both < 2 * COMMAND_TIMEOUT + Duration::from_secs(1), "{both:?}");
}

/// A hostile or broken Redis that answers every command with an array header of a billion
/// elements and one element: the reply parser reserves a bounded start (combine caps its
/// preallocation at 4,096), so the process does not abort on an allocation of ~50 GB; the
/// connection's setup waits for elements that never come and the check ends as unavailable
/// within the bounds.
#[tokio::test]
async fn a_reply_declaring_a_billion_elements_is_unavailable_not_an_abort() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut request = [0u8; 4096];
                while matches!(stream.read(&mut request), Ok(read) if read > 0) {
                    if stream.write_all(b"*1000000000\r\n:1\r\n").is_err() {
                        return;
                    }
                }
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), Durability::ProcessCrash).unwrap());
    let config = LimitsConfig {
        url: RedisUrl::parse(&format!("redis://127.0.0.1:{port}")).unwrap(),
        fault_tolerant: false,
        ca_file: None,
    };
    let limiter = RedisLimiter::new(&config, store).unwrap();
    let started = Instant::now();
    let verdict = limiter.take(KeyDigest::of("hostile"), limit(1.0, 1)).await;
    assert!(matches!(verdict, Err(LimitError::Unavailable(_))), "{verdict:?}");
    assert!(
        started.elapsed() < 2 * COMMAND_TIMEOUT + Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}
