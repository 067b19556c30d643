//! Tests of the SQLite store.

use super::*;
use crate::store::UploadState;
#[allow(unused_imports)]
use crate::store::*;
use crate::vocab::DialectName;

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

#[tokio::test]
async fn records_follow_their_state_and_stay_with_their_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), Durability::ProcessCrash).unwrap();
    store.insert_uploads(vec![record("a", "t1")], 1).await.unwrap();
    // A duplicate id fails alone; the group's other jobs still commit.
    let (dup, other) = tokio::join!(
        store.insert_uploads(vec![record("a", "t1")], 1),
        store.insert_uploads(vec![record("b", "t1")], 1)
    );
    assert!(dup.is_err());
    other.unwrap();
    assert_eq!(store.outbox_len().await.unwrap(), 2);
    store
        .mark_forwarded("a".into(), "r1".into(), Some("http://x".into()), 1, 1)
        .await
        .unwrap();
    let got = store.upload_of("t1".into(), "a".into()).await.unwrap().unwrap();
    assert_eq!(got.state, UploadState::Forwarded);
    assert_eq!(got.remote_id.as_deref(), Some("r1"));
    assert!(store.upload_of("t2".into(), "a".into()).await.unwrap().is_none());
    assert_eq!(store.outbox_len().await.unwrap(), 1);
    let claim = store.claim_due(i64::MAX - 10, 10, 5).await.unwrap();
    assert_eq!((claim.due.len(), claim.lease_until), (1, i64::MAX - 5));
    assert!(store.claim_due(0, 10, 5).await.unwrap().due.is_empty());
    // A claim's delivery is recorded only under that claim (its lease end): once claimed
    // again, the first claim's outcome is not written.
    assert!(
        !store
            .mark_forwarded("b".into(), "late".into(), None, 1, 1)
            .await
            .unwrap()
    );
    assert!(
        !store
            .mark_attempt_failed("b".into(), "late".into(), 1, None, 1)
            .await
            .unwrap()
    );
    assert!(
        store
            .mark_forwarded("b".into(), "r2".into(), None, 1, i64::MAX - 5)
            .await
            .unwrap()
    );
}

/// At start, the claims of the process before are void (due now), but an upload waiting out
/// a retry's backoff keeps its time: a daemon restarting in a loop does not send it again each
/// time.
#[tokio::test]
async fn a_start_voids_claims_but_not_backoffs() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), Durability::ProcessCrash).unwrap();
    let now = crate::vocab::now_ms();
    store
        .insert_uploads(vec![record("claimed", "t"), record("backing-off", "t")], now)
        .await
        .unwrap();
    let claimed = store.claim_due(now, 10, 60_000).await.unwrap();
    assert_eq!(claimed.due.len(), 2);
    let later = now + 3_600_000;
    assert!(
        store
            .mark_attempt_failed(
                "backing-off".into(),
                "503".into(),
                1,
                Some(later),
                claimed.lease_until
            )
            .await
            .unwrap()
    );
    assert_eq!(store.release_outbox_leases().await.unwrap(), 1);
    let due = store
        .claim_due(crate::vocab::now_ms(), 10, 60_000)
        .await
        .unwrap()
        .due;
    assert_eq!(
        due.iter().map(|record| record.id.as_str()).collect::<Vec<_>>(),
        vec!["claimed"]
    );
    // The backoff's upload is due at its own time.
    let at_its_time = store.claim_due(later, 10, 60_000).await.unwrap().due;
    assert!(at_its_time.iter().any(|record| record.id == "backing-off"));
}

#[tokio::test]
async fn usage_limits_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let identity = {
        let store = SqliteStore::open(dir.path(), Durability::PowerLoss).unwrap();
        assert!(
            store
                .try_add_usage("t".into(), 5, 10, 1, (Some(15), Some(5)))
                .await
                .unwrap()
        );
        assert!(
            !store
                .try_add_usage("t".into(), 5, 10, 1, (Some(15), Some(5)))
                .await
                .unwrap()
        );
        assert!(
            store
                .try_add_usage("t".into(), 5, 5, 1, (Some(15), Some(5)))
                .await
                .unwrap()
        );
        store.identity().await.unwrap()
    };
    let store = SqliteStore::open(dir.path(), Durability::ProcessCrash).unwrap();
    assert_eq!(store.usage("t".into(), 5).await.unwrap(), (15, 2));
    // The identity drawn when the store was made stays; another store draws its own.
    assert_eq!(identity.len(), 32, "{identity}");
    assert_eq!(store.identity().await.unwrap(), identity);
    let other = tempfile::tempdir().unwrap();
    let other = SqliteStore::open(other.path(), Durability::ProcessCrash).unwrap();
    assert_ne!(other.identity().await.unwrap(), identity);
}

#[tokio::test]
async fn sessions_and_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), Durability::ProcessCrash).unwrap();
    let session = SessionRecord {
        id: "s".into(),
        tenant: "t".into(),
        dialect: DialectName::Kore,
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
    };
    store.insert_session(session).await.unwrap();
    store.put_chunk("s".into(), 1, 4).await.unwrap();
    store.put_chunk("s".into(), 1, 5).await.unwrap();
    let got = store.session_of("t".into(), "s".into()).await.unwrap().unwrap();
    assert_eq!(got.chunks, vec![(1, 5)]);
    assert_eq!(
        store.session_totals().await.unwrap(),
        (1, 5),
        "a replaced chunk counts once"
    );
    assert!(
        store
            .session_of("other".into(), "s".into())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.take_expired_sessions(99).await.unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        store.take_expired_sessions(100).await.unwrap(),
        vec!["s".to_string()]
    );
    assert!(store.session_of("t".into(), "s".into()).await.unwrap().is_none());
}

#[tokio::test]
async fn a_version_4_database_keeps_its_uploads_and_records_them_without_a_temporary_btree() {
    let dir = tempfile::tempdir().unwrap();
    {
        let connection = Connection::open(dir.path().join("upgate.db")).unwrap();
        for migration in &MIGRATIONS[..4] {
            connection.execute_batch(migration).unwrap();
        }
        connection.pragma_update(None, "user_version", 4).unwrap();
        connection
            .execute(
                "INSERT INTO uploads (id, tenant, dialect, filename, extension, mime, size, sha256,
                 state, provider, created_at, updated_at, metadata, attempts, next_attempt_at)
                 VALUES ('old', 't', 'dify', 'a.txt', 'txt', 'text/plain', 3, '00', 'received',
                 'disk', 1, 2, '{\"user\":\"u\"}', 4, 5)",
                [],
            )
            .unwrap();
    }
    let store = SqliteStore::open(dir.path(), Durability::ProcessCrash).unwrap();
    let old = store
        .upload("old".into())
        .await
        .unwrap()
        .expect("the old row survives");
    assert_eq!((old.size, old.attempts, old.updated_at_ms), (3, 4, 2));
    assert_eq!(old.metadata.get("user").and_then(|v| v.as_str()), Some("u"));
    assert_eq!(store.outbox_len().await.unwrap(), 1, "its outbox entry too");
    drop(store);

    let connection = Connection::open(dir.path().join("upgate.db")).unwrap();
    let version: i64 = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .unwrap();
    assert_eq!(version as usize, MIGRATIONS.len());
    let bad_state = connection.execute(
        "INSERT INTO uploads (id, tenant, dialect, filename, extension, mime, size, sha256, state,
         provider, created_at, updated_at) VALUES ('x', 't', 'dify', 'a', '', 'm', 0, '', 'lost', 'p', 0, 0)",
        [],
    );
    assert!(bad_state.is_err(), "the state check still holds");
    let mut explain = connection
        .prepare(
            "EXPLAIN INSERT INTO uploads (id, tenant, dialect, filename, extension, mime, size, sha256,
             state, provider, created_at, updated_at) VALUES ('y', 't', 'dify', 'a', '', 'm', 0, '', 'received', 'p', 0, 0)",
        )
        .unwrap();
    let opcodes: Vec<String> = explain
        .query_map([], |row| row.get::<_, String>(1))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        !opcodes.iter().any(|op| op == "OpenEphemeral"),
        "an insert builds no temporary b-tree: {opcodes:?}"
    );
    // Counting a tenant's unfinished sessions reads its index, not every session kept.
    let plan: Vec<String> = connection
        .prepare("EXPLAIN QUERY PLAN SELECT COUNT(*) FROM sessions WHERE tenant = ?1 AND upload_id IS NULL")
        .unwrap()
        .query_map(["t"], |row| row.get::<_, String>(3))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(
        plan.iter().any(|step| step.contains("sessions_open_by_tenant")),
        "{plan:?}"
    );
}

#[tokio::test]
async fn resumable_sessions_keep_their_length_role_and_record() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), Durability::ProcessCrash).unwrap();
    let session = SessionRecord {
        id: "r".into(),
        tenant: "t".into(),
        dialect: DialectName::Tus,
        filename: "f.txt".into(),
        extension: "txt".into(),
        declared_size: 0,
        total_chunks: 1,
        metadata: Default::default(),
        created_at_ms: 0,
        expires_at_ms: 100,
        chunks: vec![],
        length_deferred: true,
        concat: Some(crate::store::Concat::Partial),
        upload_id: None,
    };
    store.insert_session(session.clone()).await.unwrap();
    let got = store.session_of("t".into(), "r".into()).await.unwrap().unwrap();
    assert_eq!(got, session);
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
        concat: Some(crate::store::Concat::Final {
            parts: vec!["p2".into(), "p1".into()],
        }),
        ..session
    };
    store.insert_session(joined.clone()).await.unwrap();
    let got = store.session_of("t".into(), "f".into()).await.unwrap().unwrap();
    assert_eq!(got, joined);
    // `sessions list --json` keeps naming the role only.
    assert_eq!(
        serde_json::to_value(&got).unwrap()["concat"],
        serde_json::json!("final")
    );
}

#[test]
fn a_full_disk_is_its_own_error_and_a_507() {
    let full = rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
    let error = StoreError::from(full);
    assert!(matches!(error, StoreError::Full), "{error:?}");
    assert_eq!(
        crate::error::ApiError::from(error).status(),
        actix_web::http::StatusCode::INSUFFICIENT_STORAGE
    );
    let other =
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT), None);
    assert!(matches!(StoreError::from(other), StoreError::Database(_)));
}

#[tokio::test]
async fn a_job_that_fails_leaves_none_of_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), Durability::ProcessCrash).unwrap();
    store.insert_uploads(vec![record("a", "t1")], 1).await.unwrap();
    // Alone in its transaction: the first record is written, the duplicate fails, neither stays.
    let failed = store
        .insert_uploads(vec![record("b", "t1"), record("a", "t1")], 1)
        .await;
    assert!(failed.is_err());
    assert_eq!(store.upload("b".into()).await.unwrap(), None, "rolled back whole");
    // A delivery's outcome is written over its `delivering` record only.
    let mut delivering = record("c", "t1");
    delivering.state = UploadState::Delivering;
    store.insert_uploads(vec![delivering.clone()], 10).await.unwrap();
    delivering.state = UploadState::Forwarded;
    delivering.remote_id = Some("r".into());
    assert_eq!(
        store
            .record_outcomes(vec![delivering.clone(), record("a", "t1")])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store.upload("c".into()).await.unwrap().unwrap().state,
        UploadState::Forwarded
    );
    // One whose lease ended is failed by the sweep, once.
    let mut interrupted = record("d", "t1");
    interrupted.state = UploadState::Delivering;
    store.insert_uploads(vec![interrupted], 10).await.unwrap();
    assert!(
        store
            .fail_interrupted_deliveries(9, "interrupted: x".into())
            .await
            .unwrap()
            .is_empty(),
        "lease still running"
    );
    let failed = store
        .fail_interrupted_deliveries(10, "interrupted: x".into())
        .await
        .unwrap();
    assert_eq!(failed.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["d"]);
    assert_eq!(failed[0].state, UploadState::Failed);
    assert!(
        store
            .fail_interrupted_deliveries(i64::MAX, "again".into())
            .await
            .unwrap()
            .is_empty()
    );
}

/// The store's connections (its thread's, the checkpointer's, an operator command's) open and
/// close one database at once. SQLite 3.51.1 (rusqlite 0.38) could deadlock there, in its unix
/// VFS (a lock-order inversion between its global and per-file mutexes, rusqlite issue #1860;
/// fixed in 3.51.2), and once it did every SQLite user in the process hung: a CI run of this
/// workspace hung so. The race is too rare to provoke in a test's time, so the version is checked.
#[test]
fn the_bundled_sqlite_has_the_unix_vfs_close_deadlock_fixed() {
    assert!(
        rusqlite::version_number() >= 3_051_002,
        "SQLite {} can deadlock when connections of one database close at once; 3.51.2 or later is needed",
        rusqlite::version()
    );
}

/// Writes that never let the checkpoint thread finish (here: it never runs) would grow the WAL
/// without bound: past its limit the store thread checkpoints it, the WAL starts over and its
/// file is cut back.
#[tokio::test]
async fn the_wal_stays_bounded_when_its_checkpoints_cannot_finish() {
    let dir = tempfile::tempdir().unwrap();
    let bounds = WalBounds {
        checkpoint_every: Duration::from_secs(3600),
        limit: 256 << 10,
        look_every: Duration::ZERO,
        keep: 256 << 10,
    };
    let store = SqliteStore::open_bounded(dir.path(), Durability::ProcessCrash, bounds).unwrap();
    let wal = dir.path().join("upgate.db-wal");
    let mut largest = 0;
    for index in 0..3000 {
        store
            .insert_uploads(vec![record(&format!("u{index:05}"), "t")], 1)
            .await
            .unwrap();
        largest = largest.max(std::fs::metadata(&wal).unwrap().len());
    }
    // Without the bound: about 3000 commits of two 4 KiB pages each, 24 MiB.
    assert!(largest < 1 << 20, "the WAL grew to {largest} bytes");
    let all = UploadFilter {
        limit: 5000,
        ..Default::default()
    };
    assert_eq!(store.list_uploads(all).await.unwrap().len(), 3000);
}

/// One row no version of upgate could have written (edited by hand, another version's
/// dialect, a negative size) never holds up the others: the outbox claims the readable ones
/// and puts the bad one off; a session whose counts are out of range is an error for that
/// session, not a wrapped value; metadata that is not an object is an unreadable row.
#[tokio::test]
async fn one_unreadable_row_holds_up_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), Durability::ProcessCrash).unwrap();
    let now = crate::vocab::now_ms();
    store
        .insert_uploads(
            vec![
                record("old", "t"),
                record("future", "t"),
                record("negative", "t"),
                record("good", "t"),
            ],
            now,
        )
        .await
        .unwrap();
    let connection = Connection::open(dir.path().join("upgate.db")).unwrap();
    connection
        .execute_batch(&format!(
            "UPDATE uploads SET next_attempt_at = {} WHERE id = 'old';
             UPDATE uploads SET dialect = 'dialect-of-2030' WHERE id = 'future';
             UPDATE uploads SET size = -5 WHERE id = 'negative';",
            now - 1000
        ))
        .unwrap();
    let claim = store.claim_due(now, 10, 60_000).await.unwrap();
    let mut claimed: Vec<&str> = claim.due.iter().map(|record| record.id.as_str()).collect();
    claimed.sort_unstable();
    assert_eq!(claimed, ["good", "old"]);
    let put_off: i64 = connection
        .query_row(
            "SELECT MIN(next_attempt_at) FROM uploads WHERE id IN ('future', 'negative')",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert!(put_off >= now + UNREADABLE_ROW_WAIT_MS, "{put_off} vs {now}");
    crate::store::assert_unreadable_rows_are_errors_naming_them(&store).await;

    let mut session = SessionRecord {
        id: "s".into(),
        tenant: "t".into(),
        dialect: DialectName::Kore,
        filename: "f.txt".into(),
        extension: "txt".into(),
        declared_size: 10,
        total_chunks: 2,
        metadata: Default::default(),
        created_at_ms: 0,
        expires_at_ms: i64::MAX,
        chunks: vec![],
        length_deferred: false,
        concat: None,
        upload_id: None,
    };
    store.insert_session(session.clone()).await.unwrap();
    session.id = "m".into();
    store.insert_session(session).await.unwrap();
    connection
        .execute_batch(
            "UPDATE sessions SET total_chunks = -1 WHERE id = 's';
             UPDATE sessions SET metadata = '[1]' WHERE id = 'm';",
        )
        .unwrap();
    let error = store.session_of("t".into(), "s".into()).await.unwrap_err();
    assert!(error.to_string().contains("out of range"), "{error}");
    let error = store.session_of("t".into(), "m".into()).await.unwrap_err();
    assert!(error.to_string().contains("not a JSON object"), "{error}");
}

#[test]
fn a_database_of_a_newer_schema_is_refused_not_read() {
    let dir = tempfile::tempdir().unwrap();
    drop(SqliteStore::open(dir.path(), Durability::ProcessCrash).unwrap());
    let connection = Connection::open(dir.path().join("upgate.db")).unwrap();
    connection
        .pragma_update(None, "user_version", (MIGRATIONS.len() + 1) as i64)
        .unwrap();
    let Err(error) = SqliteStore::open(dir.path(), Durability::ProcessCrash) else {
        panic!("a database of a newer schema was opened");
    };
    assert!(error.to_string().contains("newer than this upgate's"), "{error}");
}
