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
