//! The `sessions` and `session_chunks` tables: chunked and resumable uploads in progress.

use tokio_postgres::Row;

use super::{PostgresStore, big, on_db_clock, parse_column, unsigned};
use crate::store::{Concat, SessionRecord, StoreError, stored_metadata, stored_unsigned, unreadable_row};
use crate::vocab::DialectName;

/// The columns [`session_from_row`] reads, the session's chunks in the same snapshot.
macro_rules! session_select {
    () => {
        "SELECT id, tenant, dialect, filename, extension, declared_size, total_chunks, metadata,
         created_at, expires_at, length_deferred, concat, upload_id, concat_parts,
         ARRAY(SELECT chunk_number FROM session_chunks WHERE session_id = s.id ORDER BY chunk_number),
         ARRAY(SELECT size FROM session_chunks WHERE session_id = s.id ORDER BY chunk_number)
         FROM sessions s"
    };
}

fn session_from_row(row: &Row) -> Result<SessionRecord, StoreError> {
    let metadata: &str = row.try_get(7)?;
    let numbers: Vec<i64> = row.try_get(14)?;
    let sizes: Vec<i64> = row.try_get(15)?;
    let chunk = |(number, size): (i64, i64)| -> Result<(u64, u64), String> {
        Ok((
            stored_unsigned("chunk_number", number)?,
            stored_unsigned("size", size)?,
        ))
    };
    SessionRecord {
        id: row.try_get(0)?,
        tenant: row.try_get(1)?,
        dialect: parse_column(row, 2, DialectName::parse)?,
        filename: row.try_get(3)?,
        extension: row.try_get(4)?,
        declared_size: unsigned(row, 5)?,
        total_chunks: unsigned(row, 6)?,
        metadata: stored_metadata(metadata).map_err(StoreError::Database)?,
        created_at_ms: row.try_get(8)?,
        expires_at_ms: row.try_get(9)?,
        chunks: numbers
            .into_iter()
            .zip(sizes)
            .map(chunk)
            .collect::<Result<_, _>>()
            .map_err(StoreError::Database)?,
        length_deferred: row.try_get(10)?,
        concat: match row.try_get::<_, Option<&str>>(11)? {
            Some(_) => {
                let parts: Option<&str> = row.try_get(13)?;
                Some(parse_column(row, 11, |kind| Concat::from_columns(kind, parts))?)
            }
            None => None,
        },
        upload_id: row.try_get(12)?,
    }
    .checked()
    .map_err(StoreError::Database)
}

impl PostgresStore {
    pub(super) async fn insert_session(&self, session: SessionRecord) -> Result<(), StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let insert = connection
                    .prepare(
                        "INSERT INTO sessions (id, tenant, dialect, filename, extension, declared_size, total_chunks,
                         metadata, created_at, expires_at, length_deferred, concat, upload_id, concat_parts)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                    )
                    .await?;
                let metadata = serde_json::Value::Object(session.metadata).to_string();
                let chunk = connection
                    .prepare("INSERT INTO session_chunks (session_id, chunk_number, size) VALUES ($1, $2, $3)")
                    .await?;
                let transaction = connection.client().transaction().await?;
                transaction
                    .execute(
                        &insert,
                        &[
                            &session.id,
                            &session.tenant,
                            &session.dialect.as_str(),
                            &session.filename,
                            &session.extension,
                            &big(session.declared_size),
                            &big(session.total_chunks),
                            &metadata,
                            &session.created_at_ms,
                            &session.expires_at_ms,
                            &session.length_deferred,
                            &session.concat.as_ref().map(Concat::as_str),
                            &session.upload_id,
                            &session.concat.as_ref().and_then(Concat::parts_column),
                        ],
                    )
                    .await?;
                for (number, size) in &session.chunks {
                    transaction
                        .execute(&chunk, &[&session.id, &big(*number), &big(*size)])
                        .await?;
                }
                transaction.commit().await?;
                Ok(())
            })
        })
        .await
    }

    /// A session by id with its chunks, only if it belongs to `tenant`.
    pub(super) async fn session_of(
        &self,
        tenant: String,
        id: String,
    ) -> Result<Option<SessionRecord>, StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let select = connection
                    .prepare(concat!(session_select!(), " WHERE id = $1 AND tenant = $2"))
                    .await?;
                let row = connection.client().query_opt(&select, &[&id, &tenant]).await?;
                row.as_ref().map(session_from_row).transpose()
            })
        })
        .await
    }

    pub(super) async fn list_sessions(&self) -> Result<Vec<SessionRecord>, StoreError> {
        self.call(|connection| {
            Box::pin(async move {
                let select = connection
                    .prepare(concat!(session_select!(), " ORDER BY created_at, id"))
                    .await?;
                let rows = connection.client().query(&select, &[]).await?;
                rows.iter()
                    .map(|row| {
                        session_from_row(row).map_err(|error| {
                            unreadable_row(&row.try_get::<_, String>(0).unwrap_or_default(), error)
                        })
                    })
                    .collect()
            })
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
            Box::pin(async move {
                let upsert = connection
                    .prepare(
                        "INSERT INTO session_chunks (session_id, chunk_number, size) VALUES ($1, $2, $3)
                         ON CONFLICT (session_id, chunk_number) DO UPDATE SET size = EXCLUDED.size",
                    )
                    .await?;
                connection
                    .client()
                    .execute(&upsert, &[&session_id, &big(chunk_number), &big(size)])
                    .await?;
                Ok(())
            })
        })
        .await
    }

    pub(super) async fn delete_session(&self, id: String) -> Result<(), StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let delete = connection.prepare("DELETE FROM sessions WHERE id = $1").await?;
                connection.client().execute(&delete, &[&id]).await?;
                Ok(())
            })
        })
        .await
    }

    /// Takes (or renews) the lease of session `id` for `holder` until `until_ms`, unless
    /// another holder's lease runs at `now`: both moved onto PostgreSQL's clock, so that
    /// the nodes' own clocks need not agree.
    pub(super) async fn lease_session(
        &self,
        id: String,
        holder: String,
        now: i64,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        let clock = self.node_clock;
        self.call(move |connection| {
            Box::pin(async move {
                let lease = connection
                    .prepare(concat!(
                        "INSERT INTO session_leases (session_id, holder, until_ms) VALUES ($1, $2, ",
                        on_db_clock!("$3", "$5"),
                        ") ON CONFLICT (session_id) DO UPDATE SET holder = EXCLUDED.holder, until_ms = EXCLUDED.until_ms
                         WHERE session_leases.holder = EXCLUDED.holder OR session_leases.until_ms < ",
                        on_db_clock!("$4", "$5")
                    ))
                    .await?;
                let taken = connection
                    .client()
                    .execute(&lease, &[&id, &holder, &until_ms, &now, &clock()])
                    .await?;
                Ok(taken == 1)
            })
        })
        .await
    }

    pub(super) async fn release_session_lease(&self, id: String, holder: String) -> Result<(), StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let release = connection
                    .prepare("DELETE FROM session_leases WHERE session_id = $1 AND holder = $2")
                    .await?;
                connection.client().execute(&release, &[&id, &holder]).await?;
                Ok(())
            })
        })
        .await
    }

    pub(super) async fn set_session_length(&self, id: String, length: u64) -> Result<(), StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let update = connection
                    .prepare("UPDATE sessions SET declared_size = $2, length_deferred = FALSE WHERE id = $1")
                    .await?;
                connection.client().execute(&update, &[&id, &big(length)]).await?;
                Ok(())
            })
        })
        .await
    }

    pub(super) async fn set_session_upload(
        &self,
        id: String,
        upload_id: Option<String>,
    ) -> Result<(), StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let update = connection
                    .prepare("UPDATE sessions SET upload_id = $2 WHERE id = $1")
                    .await?;
                connection.client().execute(&update, &[&id, &upload_id]).await?;
                Ok(())
            })
        })
        .await
    }

    /// Deletes the sessions expired at `now` and returns their ids (their chunk files are
    /// the caller's to remove, on the node that has them).
    pub(super) async fn take_expired_sessions(&self, now: i64) -> Result<Vec<String>, StoreError> {
        let clock = self.node_clock;
        self.call(move |connection| {
            Box::pin(async move {
                let delete = connection
                    .prepare("DELETE FROM sessions WHERE expires_at <= $1 RETURNING id")
                    .await?;
                let rows = connection.client().query(&delete, &[&now]).await?;
                // Leases a node held when it died, long over (a live one is renewed).
                let stale = connection
                    .prepare(concat!(
                        "DELETE FROM session_leases WHERE until_ms < ",
                        on_db_clock!("$1", "$2")
                    ))
                    .await?;
                connection.client().execute(&stale, &[&now, &clock()]).await?;
                rows.iter()
                    .map(|row| row.try_get(0).map_err(StoreError::from))
                    .collect()
            })
        })
        .await
    }

    /// All session ids (for cleaning chunk directories left without a session).
    pub(super) async fn session_ids(&self) -> Result<Vec<String>, StoreError> {
        self.call(|connection| {
            Box::pin(async move {
                let select = connection.prepare("SELECT id FROM sessions").await?;
                let rows = connection.client().query(&select, &[]).await?;
                rows.iter()
                    .map(|row| row.try_get(0).map_err(StoreError::from))
                    .collect()
            })
        })
        .await
    }

    pub(super) async fn session_totals(&self) -> Result<(u64, u64), StoreError> {
        self.call(|connection| {
            Box::pin(async move {
                let totals = connection
                    .prepare(
                        "SELECT (SELECT COUNT(*) FROM sessions), (SELECT COALESCE(SUM(size), 0)::bigint FROM session_chunks)",
                    )
                    .await?;
                let row = connection.client().query_one(&totals, &[]).await?;
                let (sessions, bytes) = (row.try_get::<_, i64>(0)?, row.try_get::<_, i64>(1)?);
                Ok((sessions.max(0) as u64, bytes.max(0) as u64))
            })
        })
        .await
    }

    pub(super) async fn open_sessions_of(&self, tenant: String) -> Result<u64, StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let count = connection
                    .prepare("SELECT COUNT(*) FROM sessions WHERE tenant = $1 AND upload_id IS NULL")
                    .await?;
                let row = connection.client().query_one(&count, &[&tenant]).await?;
                Ok(row.try_get::<_, i64>(0)? as u64)
            })
        })
        .await
    }
}
