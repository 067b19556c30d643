//! The `sessions` and `session_chunks` tables: chunked uploads in progress.

use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, id_text, parse_column, unreadable, unsigned};
use crate::store::{Concat, SessionRecord, StoreError, stored_metadata, unreadable_row};
use crate::vocab::DialectName;

const SESSION_COLUMNS: &str = "id, tenant, dialect, filename, extension, declared_size, total_chunks, metadata, \
     created_at, expires_at, length_deferred, concat, upload_id, concat_parts";

fn session_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRecord> {
    let metadata: String = row.get(7)?;
    Ok(SessionRecord {
        id: row.get(0)?,
        tenant: row.get(1)?,
        dialect: parse_column(2, &row.get::<_, String>(2)?, DialectName::parse)?,
        filename: row.get(3)?,
        extension: row.get(4)?,
        declared_size: unsigned(row, 5)?,
        total_chunks: unsigned(row, 6)?,
        metadata: unreadable(7, stored_metadata(&metadata))?,
        created_at_ms: row.get(8)?,
        expires_at_ms: row.get(9)?,
        chunks: Vec::new(),
        length_deferred: row.get(10)?,
        concat: match row.get::<_, Option<String>>(11)? {
            Some(kind) => {
                let parts = row.get::<_, Option<String>>(13)?;
                Some(parse_column(11, &kind, |kind| {
                    Concat::from_columns(kind, parts.as_deref())
                })?)
            }
            None => None,
        },
        upload_id: row.get(12)?,
    })
}

/// The session with its chunks, ordered by number.
fn with_chunks(
    connection: &rusqlite::Connection,
    mut session: SessionRecord,
) -> Result<SessionRecord, StoreError> {
    let mut statement = connection.prepare_cached(
        "SELECT chunk_number, size FROM session_chunks WHERE session_id = ?1 ORDER BY chunk_number",
    )?;
    session.chunks = statement
        .query_map(params![session.id], |row| {
            Ok((unsigned(row, 0)?, unsigned(row, 1)?))
        })?
        .collect::<Result<_, _>>()?;
    session.checked().map_err(StoreError::Database)
}

impl SqliteStore {
    pub(super) async fn insert_session(&self, session: SessionRecord) -> Result<(), StoreError> {
        self.call(move |connection| {
            connection.execute(
                "INSERT INTO sessions (id, tenant, dialect, filename, extension, declared_size, total_chunks,
                 metadata, created_at, expires_at, length_deferred, concat, upload_id, concat_parts)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                params![
                    session.id,
                    session.tenant,
                    session.dialect.as_str(),
                    session.filename,
                    session.extension,
                    session.declared_size as i64,
                    session.total_chunks as i64,
                    serde_json::Value::Object(session.metadata).to_string(),
                    session.created_at_ms,
                    session.expires_at_ms,
                    session.length_deferred,
                    session.concat.as_ref().map(Concat::as_str),
                    session.upload_id,
                    session.concat.as_ref().and_then(Concat::parts_column),
                ],
            )?;
            // In the job's transaction (see `SqliteStore::call`): all or nothing.
            for (number, size) in &session.chunks {
                connection.execute(
                    "INSERT INTO session_chunks (session_id, chunk_number, size) VALUES (?1, ?2, ?3)",
                    params![session.id, *number as i64, *size as i64],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// A session by id, only if it belongs to `tenant`.
    pub(super) async fn session_of(
        &self,
        tenant: String,
        id: String,
    ) -> Result<Option<SessionRecord>, StoreError> {
        self.call(move |connection| {
            let session = connection
                .query_row(
                    &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1 AND tenant = ?2"),
                    params![id, tenant],
                    session_from_row,
                )
                .optional()?;
            session
                .map(|session| with_chunks(connection, session))
                .transpose()
        })
        .await
    }

    pub(super) async fn list_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        self.call(move |connection| {
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions ORDER BY created_at"
            ))?;
            let rows: Vec<(rusqlite::types::Value, rusqlite::Result<SessionRecord>)> = statement
                .query_map([], |row| Ok((row.get(0)?, session_from_row(row))))?
                .collect::<Result<_, _>>()?;
            rows.into_iter()
                .map(|(id, session)| {
                    session
                        .map_err(StoreError::from)
                        .and_then(|session| with_chunks(connection, session))
                        .map_err(|error| unreadable_row(&id_text(&id), error))
                })
                .collect()
        })
        .await
    }

    /// Records a chunk (replacing an earlier copy of the same number).
    pub(super) async fn put_chunk(
        &self,
        session_id: String,
        chunk_number: u64,
        size: u64,
    ) -> Result<(), StoreError> {
        self.call(move |connection| {
            connection.execute(
                "INSERT INTO session_chunks (session_id, chunk_number, size) VALUES (?1, ?2, ?3)
                 ON CONFLICT (session_id, chunk_number) DO UPDATE SET size = ?3",
                params![session_id, chunk_number as i64, size as i64],
            )?;
            Ok(())
        })
        .await
    }

    pub(super) async fn delete_session(&self, id: String) -> Result<(), StoreError> {
        self.call(move |connection| {
            connection.execute("DELETE FROM sessions WHERE id = ?1", params![id])?;
            Ok(())
        })
        .await
    }

    /// One process uses a SQLite store, and its in-process session lock serializes the
    /// work on a session: every lease is granted, nothing is written.
    pub(super) async fn lease_session(
        &self,
        _id: String,
        _holder: String,
        _now: i64,
        _until_ms: i64,
    ) -> Result<bool, StoreError> {
        Ok(true)
    }

    pub(super) async fn release_session_lease(&self, _id: String, _holder: String) -> Result<(), StoreError> {
        Ok(())
    }

    pub(super) async fn set_session_length(&self, id: String, length: u64) -> Result<(), StoreError> {
        self.call(move |connection| {
            connection.execute(
                "UPDATE sessions SET declared_size = ?2, length_deferred = 0 WHERE id = ?1",
                params![id, length as i64],
            )?;
            Ok(())
        })
        .await
    }

    pub(super) async fn set_session_upload(
        &self,
        id: String,
        upload_id: Option<String>,
    ) -> Result<(), StoreError> {
        self.call(move |connection| {
            connection.execute(
                "UPDATE sessions SET upload_id = ?2 WHERE id = ?1",
                params![id, upload_id],
            )?;
            Ok(())
        })
        .await
    }

    /// Deletes the sessions expired at `now` and returns their ids (their chunk files are
    /// the caller's to remove).
    pub(super) async fn take_expired_sessions(&self, now: i64) -> Result<Vec<String>, StoreError> {
        self.call(move |connection| {
            let mut statement =
                connection.prepare_cached("DELETE FROM sessions WHERE expires_at <= ?1 RETURNING id")?;
            Ok(statement
                .query_map(params![now], |row| row.get(0))?
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    /// All session ids (for cleaning chunk directories left without a session).
    pub(super) async fn session_ids(&self) -> Result<Vec<String>, StoreError> {
        self.call(|connection| {
            let mut statement = connection.prepare_cached("SELECT id FROM sessions")?;
            Ok(statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn session_totals(&self) -> Result<(u64, u64), StoreError> {
        self.call(|connection| {
            let (sessions, bytes) = connection.query_row(
                "SELECT (SELECT COUNT(*) FROM sessions), (SELECT COALESCE(SUM(size), 0) FROM session_chunks)",
                [],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)),
            )?;
            Ok((sessions.max(0) as u64, bytes.max(0) as u64))
        })
        .await
    }

    pub(super) async fn open_sessions_of(&self, tenant: String) -> Result<u64, StoreError> {
        self.call(move |connection| {
            Ok(connection.query_row(
                "SELECT COUNT(*) FROM sessions WHERE tenant = ?1 AND upload_id IS NULL",
                [tenant],
                |row| row.get::<_, i64>(0),
            )? as u64)
        })
        .await
    }
}
