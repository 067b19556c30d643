//! Tests of chunked sessions: missing chunk numbers.

use super::*;

/// A Kore session of 4 chunks holding `chunks` (number, size).
pub(super) fn session(chunks: Vec<(u64, u64)>) -> SessionRecord {
    SessionRecord {
        id: "s".into(),
        tenant: "t".into(),
        dialect: DialectName::Kore,
        filename: "f.png".into(),
        extension: "png".into(),
        declared_size: 10,
        total_chunks: 4,
        metadata: Default::default(),
        created_at_ms: 0,
        expires_at_ms: 1,
        chunks,
        length_deferred: false,
        concat: None,
        upload_id: None,
    }
}

#[test]
fn missing_chunk_numbers() {
    assert_eq!(missing_chunks(&session(vec![])), vec![0, 1, 2, 3]);
    assert_eq!(missing_chunks(&session(vec![(0, 3), (2, 3)])), vec![1, 3]);
    assert!(missing_chunks(&session(vec![(0, 1), (1, 1), (2, 1), (3, 1)])).is_empty());
}
