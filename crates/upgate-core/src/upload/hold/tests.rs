//! Tests of the per-session locks of this process.

use super::*;

#[tokio::test]
async fn session_locks_exclude_each_other_and_clean_up() {
    let first = lock_session("a").await;
    let waiting = tokio::spawn(async {
        let _second = lock_session("a").await;
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished());
    // Another session is not blocked.
    drop(lock_session("b").await);
    drop(first);
    waiting.await.unwrap();
    assert!(!LOCKS.lock().unwrap().contains_key("a"));
    assert!(!LOCKS.lock().unwrap().contains_key("b"));
}

#[tokio::test]
async fn trying_a_held_lock_never_waits() {
    let held = lock_session("c").await;
    assert!(try_lock_session("c").is_none(), "a held session was locked again");
    assert!(try_lock_session("d").is_some());
    drop(held);
    let taken = try_lock_session("c").expect("a free session");
    assert!(try_lock_session("c").is_none());
    drop(taken);
    assert!(!LOCKS.lock().unwrap().contains_key("c"));
    assert!(!LOCKS.lock().unwrap().contains_key("d"));
}
