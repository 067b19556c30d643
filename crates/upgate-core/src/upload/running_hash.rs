//! The sha256 of a session's bytes kept in this process as they grow: a Kore session's
//! chunks written in place, a tus upload's appends. Each request hashes its bytes on from
//! the state the previous one left at its end offset, so completing the session needs no
//! hashing pass; after a restart, on another node, or once the bytes changed, the state is
//! not known and the completion reads the file once instead.
//!
//! What flows through here: session ids, end offsets and sha256 states.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use sha2::Sha256;

/// The sha256 state of each session's prefix: its bytes `0..end`.
static RUNNING: LazyLock<Mutex<HashMap<String, (u64, Sha256)>>> = LazyLock::new(Default::default);

/// The running hash of sessions' prefixes.
pub(crate) struct RunningHash;

impl RunningHash {
    /// The state to hash a chunk starting at `offset` on from: the prefix's, if it ends
    /// there (a fresh state at 0); `None` when this process does not know it.
    pub(crate) fn at(session: &str, offset: u64) -> Option<Sha256> {
        if offset == 0 {
            return Some(Sha256::default());
        }
        let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        running
            .get(session)
            .filter(|(end, _)| *end == offset)
            .map(|(_, state)| state.clone())
    }

    /// [`RunningHash::at`], the state taken out: the session has none until it is
    /// [advanced](RunningHash::advance) again.
    pub(crate) fn take(session: &str, offset: u64) -> Option<Sha256> {
        let taken = RUNNING.lock().unwrap_or_else(|e| e.into_inner()).remove(session);
        match taken {
            _ if offset == 0 => Some(Sha256::default()),
            Some((end, state)) if end == offset => Some(state),
            _ => None,
        }
    }

    /// The prefix of `session` now ends at `end`, hashed up to there by `state`.
    pub(crate) fn advance(session: &str, end: u64, state: Sha256) {
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        running.insert(session.to_owned(), (end, state));
    }

    /// Forgets the state of `session` (its prefix changed, or it ended).
    pub(crate) fn forget(session: &str) {
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).remove(session);
    }

    /// Keeps only the states of sessions `exists` says still exist: on several nodes, the
    /// node that completes, terminates or sweeps a session is not always the one that
    /// hashed some of it.
    pub(crate) fn retain(exists: impl Fn(&str) -> bool) {
        RUNNING
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|session, _| exists(session));
    }

    /// Whether no state is kept.
    pub(crate) fn is_empty() -> bool {
        RUNNING.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// The sha256 of the first `len` bytes of `session`'s prefix, if this process hashed
    /// exactly those.
    pub(crate) fn sha256_of(session: &str, len: u64) -> Option<String> {
        use sha2::Digest;
        let running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        let (end, state) = running.get(session)?;
        (*end == len).then(|| hex::encode(state.clone().finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_hash_goes_on_only_from_where_the_prefix_ends() {
        use sha2::Digest;
        assert!(RunningHash::at("running-a", 0).is_some(), "a prefix starts empty");
        assert!(RunningHash::at("running-a", 5).is_none(), "unknown");
        let mut state = RunningHash::at("running-a", 0).unwrap();
        state.update(b"hello");
        RunningHash::advance("running-a", 5, state);
        assert!(RunningHash::at("running-a", 4).is_none());
        let mut state = RunningHash::at("running-a", 5).unwrap();
        state.update(b" world");
        RunningHash::advance("running-a", 11, state);
        assert_eq!(RunningHash::sha256_of("running-a", 5), None);
        assert_eq!(
            RunningHash::sha256_of("running-a", 11),
            Some(hex::encode(Sha256::digest(b"hello world")))
        );
        assert!(RunningHash::take("running-a", 5).is_none(), "not where it ends");
        assert!(RunningHash::at("running-a", 11).is_none(), "taking forgets");
        let mut state = RunningHash::at("running-a", 0).unwrap();
        state.update(b"hello");
        RunningHash::advance("running-a", 5, state);
        assert!(RunningHash::take("running-a", 5).is_some());
        assert_eq!(RunningHash::sha256_of("running-a", 5), None, "taken");
        RunningHash::advance("running-a", 3, Sha256::default());
        RunningHash::forget("running-a");
        assert_eq!(RunningHash::sha256_of("running-a", 3), None);
    }

    #[test]
    fn states_of_sessions_gone_from_the_store_are_dropped() {
        RunningHash::advance("retain-kept", 3, Sha256::default());
        RunningHash::advance("retain-gone", 3, Sha256::default());
        RunningHash::retain(|id| !id.starts_with("retain-") || id == "retain-kept");
        assert!(RunningHash::sha256_of("retain-kept", 3).is_some());
        assert!(RunningHash::sha256_of("retain-gone", 3).is_none());
        RunningHash::forget("retain-kept");
    }
}
