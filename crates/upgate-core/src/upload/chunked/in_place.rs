//! Chunks written in place: a session's chunks that arrive in order go back to back into
//! one file of the session (the spool's in-place file), so that completing the session
//! hashes that file and links it into the spool instead of writing the whole upload again.
//!
//! What flows through here: a session's recorded chunk sizes, the chunk numbers the spool
//! holds in files of their own, and the in-place file's length. The first `in_place` chunks
//! of the [`Layout`] are in the in-place file: chunk numbers from 0 up, each recorded,
//! without a file of its own, within the file's length. A chunk goes in place when it is
//! the next one of that prefix and not recorded yet, and no other request of this process
//! writes in place for the session ([`InPlaceWriter`]); every other chunk (one sent out of
//! order, a re-sent one, one on a spool that keeps chunks apart) gets a file of its own. A
//! chunk that replaces one in the prefix first moves the prefix's later chunks out into
//! files of their own (their offsets depend on its size), and an in-place chunk whose
//! prefix changed while it arrived is moved out at its commit: bytes in the in-place file
//! beyond the prefix are never read.
//!
//! The sha256 of the prefix is kept in this process as it grows
//! ([`RunningHash`](crate::upload::running_hash::RunningHash)): each chunk in place is
//! hashed on from the state its predecessor left, so a session completed all in place
//! needs no hashing pass (after a restart, or once the prefix changed, the completion reads
//! the file once instead).

use std::collections::{HashMap, HashSet};
use std::sync::{LazyLock, Mutex};

use crate::spool::Spool;
use crate::store::SessionRecord;

/// Which chunks of a session are in its in-place file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Chunks `0..in_place` are in the in-place file, back to back.
    pub(crate) in_place: u64,
    /// Their bytes: where the next chunk in place starts.
    pub(crate) offset: u64,
}

impl Layout {
    /// The layout of `session`, given the chunk numbers with files of their own and the
    /// in-place file's length (`None`: the spool keeps no in-place file).
    pub(crate) fn of(session: &SessionRecord, separate: &HashSet<u64>, in_place_len: Option<u64>) -> Self {
        let mut layout = Self {
            in_place: 0,
            offset: 0,
        };
        let Some(len) = in_place_len else {
            return layout;
        };
        let sizes: HashMap<u64, u64> = session.chunks.iter().copied().collect();
        while layout.in_place < session.total_chunks {
            match sizes.get(&layout.in_place) {
                Some(size) if !separate.contains(&layout.in_place) && layout.offset + size <= len => {
                    layout.offset += size;
                    layout.in_place += 1;
                }
                _ => break,
            }
        }
        layout
    }

    /// Reads the spool's side of the layout of `session` (blocks).
    pub(crate) fn read(spool: &dyn Spool, session: &SessionRecord) -> std::io::Result<Self> {
        let (separate, len) = spool.chunk_layout(&session.id)?;
        Ok(Self::of(session, &separate, len))
    }

    /// Where chunk `number` of the prefix starts (its recorded predecessors' sizes).
    pub(crate) fn offset_of(session: &SessionRecord, number: u64) -> u64 {
        session
            .chunks
            .iter()
            .filter(|(n, _)| *n < number)
            .map(|(_, size)| size)
            .sum()
    }
}

/// Sessions a request of this process is writing a chunk in place for.
static WRITERS: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);

/// The one in-place writer of a session in this process, while it lives.
pub(crate) struct InPlaceWriter {
    session: String,
}

impl InPlaceWriter {
    /// The session's in-place writer, unless another request has it.
    pub(crate) fn try_take(session: &str) -> Option<Self> {
        let mut writers = WRITERS.lock().unwrap_or_else(|e| e.into_inner());
        writers.insert(session.to_owned()).then(|| Self {
            session: session.to_owned(),
        })
    }
}

impl InPlaceWriter {
    pub(crate) fn session(&self) -> &str {
        &self.session
    }
}

impl Drop for InPlaceWriter {
    fn drop(&mut self) {
        WRITERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.session);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upload::chunked::tests::session;

    #[test]
    fn the_prefix_stops_at_a_gap_a_chunk_of_its_own_or_the_file_end() {
        let all = session(vec![(0, 10), (1, 10), (2, 10), (3, 10)]);
        let none = HashSet::new();
        assert_eq!(
            Layout::of(&all, &none, Some(40)),
            Layout {
                in_place: 4,
                offset: 40
            }
        );
        assert_eq!(
            Layout::of(&all, &none, Some(35)).in_place,
            3,
            "the file ends inside chunk 3"
        );
        assert_eq!(Layout::of(&all, &HashSet::from([1]), Some(40)).in_place, 1);
        assert_eq!(
            Layout::of(&session(vec![(0, 10), (2, 10)]), &none, Some(40)),
            Layout {
                in_place: 1,
                offset: 10
            },
            "chunk 1 is missing"
        );
        assert_eq!(Layout::of(&all, &none, None).in_place, 0, "no in-place file");
        assert_eq!(Layout::offset_of(&all, 3), 30);
    }

    #[test]
    fn one_in_place_writer_per_session() {
        let first = InPlaceWriter::try_take("in-place-a").expect("free");
        assert!(InPlaceWriter::try_take("in-place-a").is_none());
        assert!(InPlaceWriter::try_take("in-place-b").is_some());
        drop(first);
        assert!(InPlaceWriter::try_take("in-place-a").is_some());
    }
}
