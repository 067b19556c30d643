//! Tests of the PostgreSQL store, against a real server of their own
//! ([`upgate_e2e::postgres::PostgresServer`]): the SQLite store's tests, and what only a
//! shared store must hold (concurrent claims, quotas, migrations; an outage).

use std::time::{Duration, Instant};

use upgate_e2e::postgres::PostgresServer;

use super::*;
#[allow(unused_imports)]
use crate::store::*;
use crate::store::{Concat, UploadState};
use crate::vocab::DialectName;

fn url(server: &PostgresServer, database: &str) -> PostgresUrl {
    server.create_database(database);
    PostgresUrl::parse(&server.url(database)).unwrap()
}

fn record(id: &str, tenant: &str) -> UploadRecord {
    UploadRecord {
        id: id.into(),
        tenant: tenant.into(),
        dialect: DialectName::Dify,
        filename: "a.txt".into(),
        extension: "txt".into(),
        mime: "text/plain".into(),
        size: 3,
        sha256: "00".into(),
        state: UploadState::Received,
        provider: "disk".into(),
        remote_id: None,
        remote_url: None,
        metadata: Default::default(),
        attempts: 0,
        last_error: None,
        created_at_ms: 1,
        updated_at_ms: 1,
    }
}

fn session(id: &str, dialect: DialectName) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        tenant: "t".into(),
        dialect,
        filename: "f.mp3".into(),
        extension: "mp3".into(),
        declared_size: 10,
        total_chunks: 2,
        metadata: Default::default(),
        created_at_ms: 0,
        expires_at_ms: 100,
        chunks: vec![],
        length_deferred: false,
        concat: None,
        upload_id: None,
    }
}

/// One server for the tests of one function (each test has its own databases).
#[tokio::test]
async fn the_store_behaves_as_sqlite_does() {
    let server = PostgresServer::start();
    records_follow_their_state_and_stay_with_their_tenant(&url(&server, "records")).await;
    usage_limits_and_reopen(&url(&server, "usage")).await;
    sessions_and_chunks(&url(&server, "sessions")).await;
    resumable_sessions_keep_their_length_role_and_record(&url(&server, "resumable")).await;
    listings_and_retries(&url(&server, "listings")).await;
    one_unreadable_row_holds_up_nothing_else(&server).await;
}

/// As with SQLite: an outbox entry that cannot be read is put off and the others are
/// claimed; a session whose chunk count is out of range is an error for that session.
async fn one_unreadable_row_holds_up_nothing_else(server: &PostgresServer) {
    let store = PostgresStore::open(&url(server, "unreadable")).await.unwrap();
    let at = now();
    store
        .insert_uploads(
            vec![
                record("future", "t"),
                record("negative", "t"),
                record("good", "t"),
            ],
            at,
        )
        .await
        .unwrap();
    server.psql(
        "unreadable",
        "UPDATE uploads SET dialect = 'dialect-of-2030' WHERE id = 'future';
         UPDATE uploads SET size = -5 WHERE id = 'negative';",
    );
    let claim = store.claim_due(now(), 10, 60_000).await.unwrap();
    let claimed: Vec<&str> = claim.due.iter().map(|record| record.id.as_str()).collect();
    assert_eq!(claimed, ["good"]);
    let put_off: i64 = server
        .psql(
            "unreadable",
            "SELECT MIN(next_attempt_at) FROM uploads WHERE id IN ('future', 'negative')",
        )
        .parse()
        .unwrap();
    assert!(put_off >= at + UNREADABLE_ROW_WAIT_MS, "{put_off} vs {at}");
    crate::store::assert_unreadable_rows_are_errors_naming_them(&store).await;
    store
        .insert_session(session("s", DialectName::Kore))
        .await
        .unwrap();
    server.psql(
        "unreadable",
        "UPDATE sessions SET total_chunks = -1 WHERE id = 's'",
    );
    let error = store.session_of("t".into(), "s".into()).await.unwrap_err();
    assert!(error.to_string().contains("out of range"), "{error}");
}

async fn records_follow_their_state_and_stay_with_their_tenant(url: &PostgresUrl) {
    let store = PostgresStore::open(url).await.unwrap();
    let mut with_metadata = record("a", "t1");
    with_metadata
        .metadata
        .insert("user".into(), serde_json::Value::String("u".into()));
    store.insert_uploads(vec![with_metadata], 1).await.unwrap();
    // A duplicate id fails, alone, and inserts nothing of its request.
    let (dup, other) = tokio::join!(
        store.insert_uploads(vec![record("c", "t1"), record("a", "t1")], 1),
        store.insert_uploads(vec![record("b", "t1")], 1)
    );
    assert!(matches!(dup, Err(StoreError::Database(_))), "{dup:?}");
    other.unwrap();
    assert!(store.upload("c".into()).await.unwrap().is_none());
    assert_eq!(store.outbox_len().await.unwrap(), 2);
    let claim = store.claim_due(now(), 10, 60_000).await.unwrap();
    assert_eq!(claim.due.len(), 2);
    assert!(
        store
            .mark_forwarded(
                "a".into(),
                "r1".into(),
                Some("http://x".into()),
                1,
                claim.lease_until
            )
            .await
            .unwrap()
    );
    let got = store.upload_of("t1".into(), "a".into()).await.unwrap().unwrap();
    assert_eq!(got.state, UploadState::Forwarded);
    assert_eq!(got.remote_id.as_deref(), Some("r1"));
    assert_eq!(got.metadata.get("user").and_then(|v| v.as_str()), Some("u"));
    assert!(store.upload_of("t2".into(), "a".into()).await.unwrap().is_none());
    assert_eq!(store.outbox_len().await.unwrap(), 1);
    // Due again once its lease ran out (a year on).
    let due = store.claim_due(now() + 365 * 86_400_000, 10, 5).await.unwrap();
    assert_eq!(due.due.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["b"]);
    assert!(store.claim_due(0, 10, 5).await.unwrap().due.is_empty());
    assert!(store.mark_deleted("b".into()).await.unwrap());
    assert!(!store.mark_deleted("b".into()).await.unwrap(), "deleted once");
    assert!(
        !store
            .mark_forwarded("b".into(), "r2".into(), None, 1, 1)
            .await
            .unwrap(),
        "a deleted upload stays deleted"
    );
    assert_eq!(store.outbox_len().await.unwrap(), 0);
    assert!(store.spooled_ids().await.unwrap().is_empty());
}

async fn usage_limits_and_reopen(url: &PostgresUrl) {
    {
        let store = PostgresStore::open(url).await.unwrap();
        let limits = (Some(15), Some(5));
        assert!(store.try_add_usage("t".into(), 5, 10, 1, limits).await.unwrap());
        assert!(!store.try_add_usage("t".into(), 5, 10, 1, limits).await.unwrap());
        assert!(store.try_add_usage("t".into(), 5, 5, 1, limits).await.unwrap());
        // Larger than the limit on a day with no usage yet: refused too.
        assert!(!store.try_add_usage("t".into(), 6, 16, 1, limits).await.unwrap());
        assert!(
            store
                .try_add_usage("t".into(), 6, 1, 1, (None, None))
                .await
                .unwrap()
        );
        store.refund_usage("t".into(), 6, 5, 5).await.unwrap();
        assert_eq!(store.usage("t".into(), 6).await.unwrap(), (0, 0), "never below 0");
    }
    let store = PostgresStore::open(url).await.unwrap();
    assert_eq!(store.usage("t".into(), 5).await.unwrap(), (15, 2));
    assert_eq!(store.usage("other".into(), 5).await.unwrap(), (0, 0));
}

async fn sessions_and_chunks(url: &PostgresUrl) {
    let store = PostgresStore::open(url).await.unwrap();
    store
        .insert_session(session("s", DialectName::Kore))
        .await
        .unwrap();
    store.put_chunk("s".into(), 1, 4).await.unwrap();
    store.put_chunk("s".into(), 1, 5).await.unwrap();
    store.put_chunk("s".into(), 0, 2).await.unwrap();
    let got = store.session_of("t".into(), "s".into()).await.unwrap().unwrap();
    assert_eq!(got.chunks, vec![(0, 2), (1, 5)]);
    assert!(
        store
            .session_of("other".into(), "s".into())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store.put_chunk("nope".into(), 0, 1).await.is_err(),
        "a chunk needs its session"
    );
    assert_eq!(store.session_ids().await.unwrap(), vec!["s".to_string()]);
    assert_eq!(store.session_totals().await.unwrap(), (1, 7));
    assert_eq!(store.list_sessions().await.unwrap(), vec![got]);
    assert_eq!(
        store.take_expired_sessions(99).await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        store.take_expired_sessions(100).await.unwrap(),
        vec!["s".to_string()]
    );
    assert!(store.session_of("t".into(), "s".into()).await.unwrap().is_none());
    store
        .insert_session(session("d", DialectName::Kore))
        .await
        .unwrap();
    store.put_chunk("d".into(), 0, 1).await.unwrap();
    store.delete_session("d".into()).await.unwrap();
    assert_eq!(store.session_totals().await.unwrap(), (0, 0));
}

async fn resumable_sessions_keep_their_length_role_and_record(url: &PostgresUrl) {
    let store = PostgresStore::open(url).await.unwrap();
    let resumable = SessionRecord {
        declared_size: 0,
        total_chunks: 1,
        length_deferred: true,
        concat: Some(Concat::Partial),
        ..session("r", DialectName::Tus)
    };
    store.insert_session(resumable.clone()).await.unwrap();
    let got = store.session_of("t".into(), "r".into()).await.unwrap().unwrap();
    assert_eq!(got, resumable);
    store.set_session_length("r".into(), 7).await.unwrap();
    store.put_chunk("r".into(), 0, 7).await.unwrap();
    store
        .set_session_upload("r".into(), Some("u".into()))
        .await
        .unwrap();
    let got = store.session_of("t".into(), "r".into()).await.unwrap().unwrap();
    assert_eq!((got.declared_size, got.length_deferred), (7, false));
    assert_eq!(got.chunks, vec![(0, 7)]);
    assert_eq!(got.upload_id.as_deref(), Some("u"));

    // A final upload keeps the parts it joined, in order.
    let joined = SessionRecord {
        id: "f".into(),
        concat: Some(Concat::Final {
            parts: vec!["p2".into(), "p1".into()],
        }),
        ..resumable
    };
    store.insert_session(joined.clone()).await.unwrap();
    let got = store.session_of("t".into(), "f".into()).await.unwrap().unwrap();
    assert_eq!(got, joined);
}

async fn listings_and_retries(url: &PostgresUrl) {
    let store = PostgresStore::open(url).await.unwrap();
    let mut records = Vec::new();
    for (index, tenant) in ["t1", "t2", "t1"].into_iter().enumerate() {
        let mut record = record(&format!("u{index}"), tenant);
        record.created_at_ms = 10 * index as i64;
        records.push(record);
    }
    store.insert_uploads(records, 0).await.unwrap();
    // (A lease that ends at once: the others are due again below.)
    let claim = store.claim_due(now(), 10, 0).await.unwrap();
    assert!(
        store
            .mark_attempt_failed("u0".into(), "boom".into(), 3, None, claim.lease_until)
            .await
            .unwrap()
    );
    let ids = |records: Vec<UploadRecord>| records.into_iter().map(|r| r.id).collect::<Vec<_>>();
    let all = UploadFilter {
        limit: 10,
        ..Default::default()
    };
    assert_eq!(
        ids(store.list_uploads(all.clone()).await.unwrap()),
        ["u2", "u1", "u0"]
    );
    let failed = UploadFilter {
        state: Some(UploadState::Failed),
        ..all.clone()
    };
    let listed = store.list_uploads(failed.clone()).await.unwrap();
    assert_eq!(ids(listed.clone()), ["u0"]);
    assert_eq!(
        (listed[0].attempts, listed[0].last_error.as_deref()),
        (3, Some("boom"))
    );
    let of_t1_since_5 = UploadFilter {
        tenant: Some("t1".into()),
        since_ms: Some(5),
        ..all.clone()
    };
    assert_eq!(ids(store.list_uploads(of_t1_since_5).await.unwrap()), ["u2"]);
    let one = UploadFilter { limit: 1, ..all };
    assert_eq!(ids(store.list_uploads(one).await.unwrap()), ["u2"]);
    assert!(
        store.spooled_ids().await.unwrap().contains("u0"),
        "failed bytes are kept"
    );
    assert!(store.retry_upload("u0".into()).await.unwrap());
    assert!(
        !store.retry_upload("u0".into()).await.unwrap(),
        "no longer failed"
    );
    assert!(store.list_uploads(failed).await.unwrap().is_empty());
    // A retried upload is due now; the leases of a restarted node are left to run out.
    assert_eq!(store.release_outbox_leases().await.unwrap(), 0);
    let due = store.claim_due(now(), 10, 60_000).await.unwrap();
    assert_eq!(ids(due.due), ["u1", "u2", "u0"], "oldest due first");
}

fn now() -> i64 {
    crate::vocab::now_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_claims_quotas_and_one_migration() {
    let server = PostgresServer::start();
    let url = url(&server, "shared");
    // Four nodes start at once on an empty database: one migrates, the others wait.
    let opened = futures_util::future::join_all((0..4).map(|_| PostgresStore::open(&url))).await;
    let nodes: Vec<PostgresStore> = opened.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        server.psql(
            "shared",
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM schema_version"
        ),
        (1..=migrations::MIGRATIONS.len())
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(","),
        "each version applied once"
    );
    // One store, one identity, whichever node asks.
    let mut identities = Vec::new();
    for node in &nodes {
        identities.push(node.identity().await.unwrap());
    }
    assert_eq!(identities[0].len(), 32, "{identities:?}");
    assert!(
        identities.iter().all(|identity| *identity == identities[0]),
        "{identities:?}"
    );

    // Claims: 40 due uploads, polled by every node at once, each claimed exactly once.
    let records: Vec<UploadRecord> = (0..40).map(|i| record(&format!("o{i:02}"), "t")).collect();
    nodes[0].insert_uploads(records, 0).await.unwrap();
    let claims = futures_util::future::join_all(
        nodes
            .iter()
            .flat_map(|node| (0..3).map(move |_| node.claim_due(now(), 5, 60_000))),
    )
    .await;
    let mut claimed: Vec<String> = claims
        .into_iter()
        .flat_map(|claim| claim.unwrap().due)
        .map(|record| record.id)
        .collect();
    let total = claimed.len();
    claimed.sort();
    claimed.dedup();
    assert_eq!(claimed.len(), total, "no upload claimed twice");
    assert_eq!(total, 40, "12 polls of 5 claim all 40");

    // Quotas: 40 uploads race for a limit of 7 across the nodes.
    let adds = futures_util::future::join_all(
        (0..40).map(|i| nodes[i % nodes.len()].try_add_usage("q".into(), 1, 10, 1, (Some(1_000), Some(7)))),
    )
    .await;
    let passed = adds.into_iter().filter(|added| *added.as_ref().unwrap()).count();
    assert_eq!(passed, 7);
    assert_eq!(nodes[3].usage("q".into(), 1).await.unwrap(), (70, 7));

    // Outbox fencing: a claim whose lease ran out and was claimed again records nothing.
    nodes[0]
        .insert_uploads(vec![record("fenced", "t")], 0)
        .await
        .unwrap();
    let first = nodes[0].claim_due(now(), 1, 50).await.unwrap();
    assert_eq!(first.due.len(), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = nodes[1].claim_due(now(), 10, 60_000).await.unwrap();
    assert_eq!(
        second.due.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        ["fenced"]
    );
    assert!(
        !nodes[0]
            .mark_attempt_failed("fenced".into(), "late".into(), 1, Some(0), first.lease_until)
            .await
            .unwrap()
    );
    assert!(
        !nodes[0]
            .mark_forwarded("fenced".into(), "from-a".into(), None, 1, first.lease_until)
            .await
            .unwrap(),
        "the first claim's delivery is not recorded over the second claim"
    );
    nodes[0]
        .note_superseded("fenced".into(), "a late copy was deleted".into())
        .await
        .unwrap();
    assert!(
        nodes[1]
            .mark_forwarded("fenced".into(), "from-b".into(), None, 1, second.lease_until)
            .await
            .unwrap()
    );
    let fenced = nodes[2].upload("fenced".into()).await.unwrap().unwrap();
    assert_eq!(fenced.state, UploadState::Forwarded);
    assert_eq!(fenced.remote_id.as_deref(), Some("from-b"));
    assert_eq!(
        fenced.last_error.as_deref(),
        Some("superseded: a late copy was deleted"),
        "the record says what happened"
    );

    // Session leases: 8 holders race for one session across the nodes, one gets it; it is
    // renewed by its holder only; released, or run out, another may take it. (The times
    // passed in are moved onto PostgreSQL's clock at each call, which may differ by the
    // call's latency: the steps are a second apart.)
    let t = now();
    let leases = futures_util::future::join_all(
        (0..8).map(|i| nodes[i % nodes.len()].lease_session("s-1".into(), format!("h{i}"), t, t + 30_000)),
    )
    .await;
    let winners: Vec<usize> = leases
        .into_iter()
        .enumerate()
        .filter(|(_, taken)| *taken.as_ref().unwrap())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(winners.len(), 1, "{winners:?}");
    let winner = format!("h{}", winners[0]);
    assert!(
        nodes[1]
            .lease_session("s-1".into(), winner.clone(), t + 1, t + 40_000)
            .await
            .unwrap()
    );
    assert!(
        !nodes[2]
            .lease_session("s-1".into(), "other".into(), t + 39_000, t + 60_000)
            .await
            .unwrap()
    );
    assert!(
        nodes[2]
            .lease_session("s-1".into(), "other".into(), t + 41_000, t + 60_000)
            .await
            .unwrap(),
        "a lease that ran out is taken over"
    );
    nodes[0]
        .release_session_lease("s-1".into(), winner)
        .await
        .unwrap();
    assert!(
        !nodes[0]
            .lease_session("s-1".into(), "third".into(), t + 42_000, t + 60_000)
            .await
            .unwrap(),
        "a former holder's release leaves the new holder's lease alone"
    );
    nodes[3]
        .release_session_lease("s-1".into(), "other".into())
        .await
        .unwrap();
    assert!(
        nodes[0]
            .lease_session("s-1".into(), "third".into(), t + 43_000, t + 60_000)
            .await
            .unwrap()
    );
    // Its holder dies: the row stays until the sweep of expired sessions, once it ran out.
    nodes[1].take_expired_sessions(t + 59_000).await.unwrap();
    assert_eq!(server.psql("shared", "SELECT count(*) FROM session_leases"), "1");
    nodes[1].take_expired_sessions(t + 61_000).await.unwrap();
    assert_eq!(server.psql("shared", "SELECT count(*) FROM session_leases"), "0");

    // Clocks: a node whose clock runs ten minutes ahead (the times it passes in are read
    // from that clock) claims no upload another node leased for a minute, takes no session
    // lease another node holds, and sweeps none away, since leases are compared on
    // PostgreSQL's clock; what it puts in the outbox is due at once, not ten minutes late.
    let mut ahead = PostgresStore::open(&url).await.unwrap();
    ahead.node_clock = || crate::vocab::now_ms() + 600_000;
    let ahead_now = || (ahead.node_clock)();
    let ids = |claim: crate::store::Claim| claim.due.into_iter().map(|r| r.id).collect::<Vec<_>>();
    nodes[0]
        .insert_uploads(vec![record("held", "t")], now())
        .await
        .unwrap();
    // (A second later: moving each time onto PostgreSQL's clock rounds to the millisecond,
    // so "due now" may be due a millisecond after the next statement's now.)
    let soon = || now() + 1_000;
    assert_eq!(
        ids(nodes[0].claim_due(soon(), 10, 60_000).await.unwrap()),
        ["held"]
    );
    assert!(
        ids(ahead.claim_due(ahead_now(), 10, 60_000).await.unwrap()).is_empty(),
        "a lease another node holds is not taken early"
    );
    ahead
        .insert_uploads(vec![record("from-ahead", "t")], ahead_now())
        .await
        .unwrap();
    assert_eq!(
        ids(nodes[1].claim_due(soon(), 10, 60_000).await.unwrap()),
        ["from-ahead"]
    );
    let t = now();
    assert!(
        nodes[0]
            .lease_session("s-2".into(), "on-time".into(), t, t + 30_000)
            .await
            .unwrap()
    );
    let a = ahead_now();
    assert!(
        !ahead
            .lease_session("s-2".into(), "ahead".into(), a, a + 30_000)
            .await
            .unwrap(),
        "a session lease another node holds is not taken early"
    );
    ahead.take_expired_sessions(ahead_now()).await.unwrap();
    assert_eq!(
        server.psql(
            "shared",
            "SELECT holder FROM session_leases WHERE session_id = 's-2'"
        ),
        "on-time"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_unavailable_within_bounds_and_the_pool_reconnects() {
    let mut server = PostgresServer::start();
    let url = url(&server, "outage");
    let store = PostgresStore::open(&url).await.unwrap();
    store
        .insert_uploads(vec![record("before", "t")], 0)
        .await
        .unwrap();
    server.stop();
    for _ in 0..3 {
        let started = Instant::now();
        let answer = store.upload("before".into()).await;
        assert!(matches!(answer, Err(StoreError::Unavailable(_))), "{answer:?}");
        assert!(started.elapsed() <= CALL_TIMEOUT + Duration::from_secs(1));
    }
    server.start_again();
    let got = store.upload("before".into()).await.unwrap();
    assert_eq!(got.map(|record| record.id).as_deref(), Some("before"));
    // A server that hangs with the connection open: the call gives up within its bound, and
    // the connection it was on is not reused.
    server.freeze();
    let started = Instant::now();
    let answer = store.outbox_len().await;
    let took = started.elapsed();
    server.thaw();
    assert!(matches!(answer, Err(StoreError::Unavailable(_))), "{answer:?}");
    assert!(
        took >= CALL_TIMEOUT && took <= CALL_TIMEOUT + Duration::from_secs(1),
        "{took:?}"
    );
    assert_eq!(store.outbox_len().await.unwrap(), 1);
    // A database that does not answer at all (a port that accepts and says nothing) is
    // unavailable within the bounds too.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = PostgresUrl::parse(&format!(
        "postgres://u:secret@127.0.0.1:{}/db",
        silent.local_addr().unwrap().port()
    ))
    .unwrap();
    let started = Instant::now();
    let opened = PostgresStore::open(&silent_url).await;
    let Err(StoreError::Open { path, message }) = opened else {
        panic!("a silent server cannot be opened");
    };
    assert!(started.elapsed() < CONNECT_TIMEOUT + Duration::from_secs(2));
    assert!(
        !path.contains("secret") && !message.contains("secret"),
        "{path}: {message}"
    );
    assert!(PostgresStore::probe(&silent_url).await.is_err());
    drop(silent);
}
