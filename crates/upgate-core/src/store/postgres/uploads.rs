//! The `uploads` table: one row per upload, its state and its delivery.

use tokio_postgres::Row;

use super::{PostgresStore, big, db_now, on_db_clock, parse_column, unsigned};
use crate::store::{StoreError, UploadFilter, UploadRecord, UploadState, stored_metadata, unreadable_row};
use crate::vocab::{DialectName, now_ms};

/// The columns [`upload_from_row`] reads, in order.
macro_rules! upload_columns {
    () => {
        "id, tenant, dialect, filename, extension, mime, size, sha256, state, provider, \
         remote_id, remote_url, metadata, attempts, last_error, created_at, updated_at"
    };
}
pub(super) use upload_columns;

pub(super) fn upload_from_row(row: &Row) -> Result<UploadRecord, StoreError> {
    let metadata: &str = row.try_get(12)?;
    Ok(UploadRecord {
        id: row.try_get(0)?,
        tenant: row.try_get(1)?,
        dialect: parse_column(row, 2, DialectName::parse)?,
        filename: row.try_get(3)?,
        extension: row.try_get(4)?,
        mime: row.try_get(5)?,
        size: unsigned(row, 6)?,
        sha256: row.try_get(7)?,
        state: parse_column(row, 8, UploadState::parse)?,
        provider: row.try_get(9)?,
        remote_id: row.try_get(10)?,
        remote_url: row.try_get(11)?,
        metadata: stored_metadata(metadata).map_err(StoreError::Database)?,
        attempts: unsigned(row, 13)?,
        last_error: row.try_get(14)?,
        created_at_ms: row.try_get(15)?,
        updated_at_ms: row.try_get(16)?,
    })
}

impl PostgresStore {
    /// Inserts upload records, all or none. Those in state `received` enter the outbox, due
    /// at `due_ms`; those `delivering` are leased until `due_ms`; the others wait for nothing.
    pub(super) async fn insert_uploads(
        &self,
        records: Vec<UploadRecord>,
        due_ms: i64,
    ) -> Result<(), StoreError> {
        let clock = self.node_clock;
        self.call(move |connection| {
            Box::pin(async move {
                let insert = connection
                    .prepare(concat!(
                        "INSERT INTO uploads (id, tenant, dialect, filename, extension, mime, size, sha256, state,
                         provider, remote_id, remote_url, metadata, attempts, last_error, created_at, updated_at,
                         next_attempt_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, ",
                        on_db_clock!("$18", "$19"),
                        ")"
                    ))
                    .await?;
                let node_now = clock();
                let transaction = connection.client().transaction().await?;
                for record in &records {
                    let metadata = serde_json::Value::Object(record.metadata.clone()).to_string();
                    let due = record.state.waits().then_some(due_ms);
                    transaction
                        .execute(
                            &insert,
                            &[
                                &record.id,
                                &record.tenant,
                                &record.dialect.as_str(),
                                &record.filename,
                                &record.extension,
                                &record.mime,
                                &big(record.size),
                                &record.sha256,
                                &record.state.as_str(),
                                &record.provider,
                                &record.remote_id,
                                &record.remote_url,
                                &metadata,
                                &i64::from(record.attempts),
                                &record.last_error,
                                &record.created_at_ms,
                                &record.updated_at_ms,
                                &due,
                                &node_now,
                            ],
                        )
                        .await?;
                }
                transaction.commit().await?;
                Ok(())
            })
        })
        .await
    }

    /// Writes sync deliveries' outcomes over their `delivering` records, all or none.
    pub(super) async fn record_outcomes(&self, records: Vec<UploadRecord>) -> Result<usize, StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let update = connection
                    .prepare(
                        "UPDATE uploads SET state = $2, remote_id = $3, remote_url = $4, attempts = $5,
                         last_error = $6, next_attempt_at = NULL, updated_at = $7
                         WHERE id = $1 AND state = 'delivering'",
                    )
                    .await?;
                let transaction = connection.client().transaction().await?;
                let mut changed = 0;
                for record in &records {
                    changed += transaction
                        .execute(
                            &update,
                            &[
                                &record.id,
                                &record.state.as_str(),
                                &record.remote_id,
                                &record.remote_url,
                                &i64::from(record.attempts),
                                &record.last_error,
                                &now_ms(),
                            ],
                        )
                        .await? as usize;
                }
                transaction.commit().await?;
                Ok(changed)
            })
        })
        .await
    }

    /// Fails the sync deliveries whose lease ended before `now` (any node's: a live node's
    /// lease has not ended).
    pub(super) async fn fail_interrupted_deliveries(
        &self,
        now: i64,
        reason: String,
    ) -> Result<Vec<UploadRecord>, StoreError> {
        let clock = self.node_clock;
        self.call(move |connection| {
            Box::pin(async move {
                let fail = connection
                    .prepare(concat!(
                        "UPDATE uploads SET state = 'failed', last_error = $2, next_attempt_at = NULL, updated_at = $1
                         WHERE next_attempt_at IS NOT NULL AND state = 'delivering' AND next_attempt_at <= ",
                        on_db_clock!("$1", "$3"),
                        " RETURNING ",
                        upload_columns!()
                    ))
                    .await?;
                let rows = connection.client().query(&fail, &[&now, &reason, &clock()]).await?;
                // Each failed either way; one that cannot be read is named, not returned (its
                // quota stays counted).
                Ok(rows
                    .iter()
                    .filter_map(|row| {
                        upload_from_row(row)
                            .inspect_err(|error| {
                                let id = row.try_get::<_, String>(0).unwrap_or_default();
                                tracing::warn!(upload_id = %id, %error, "an interrupted delivery's row cannot be read")
                            })
                            .ok()
                    })
                    .collect())
            })
        })
        .await
    }

    /// Ids of the uploads whose bytes belong in the spool: waiting for async delivery, or
    /// failed after it (kept for the operator).
    pub(super) async fn spooled_ids(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        self.call(|connection| {
            Box::pin(async move {
                let select = connection
                    .prepare("SELECT id FROM uploads WHERE state IN ('received', 'failed')")
                    .await?;
                let rows = connection.client().query(&select, &[]).await?;
                rows.iter()
                    .map(|row| row.try_get::<_, String>(0).map_err(StoreError::from))
                    .collect()
            })
        })
        .await
    }

    pub(super) async fn mark_deleted(&self, id: String) -> Result<bool, StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let update = connection
                    .prepare(
                        "UPDATE uploads SET state = 'deleted', next_attempt_at = NULL, updated_at = $2
                         WHERE id = $1 AND state <> 'deleted'",
                    )
                    .await?;
                let changed = connection.client().execute(&update, &[&id, &now_ms()]).await?;
                Ok(changed == 1)
            })
        })
        .await
    }

    /// An upload by id, whoever's it is (operator commands).
    pub(super) async fn upload(&self, id: String) -> Result<Option<UploadRecord>, StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let select = connection
                    .prepare(concat!(
                        "SELECT ",
                        upload_columns!(),
                        " FROM uploads WHERE id = $1"
                    ))
                    .await?;
                let row = connection.client().query_opt(&select, &[&id]).await?;
                row.as_ref().map(upload_from_row).transpose()
            })
        })
        .await
    }

    pub(super) async fn list_uploads(&self, filter: UploadFilter) -> Result<Vec<UploadRecord>, StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let select = connection
                    .prepare(concat!(
                        "SELECT ",
                        upload_columns!(),
                        " FROM uploads
                         WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR tenant = $2)
                         AND ($3::bigint IS NULL OR created_at >= $3)
                         ORDER BY created_at DESC, id DESC LIMIT $4"
                    ))
                    .await?;
                let rows = connection
                    .client()
                    .query(
                        &select,
                        &[
                            &filter.state.map(UploadState::as_str),
                            &filter.tenant,
                            &filter.since_ms,
                            &big(filter.limit as u64),
                        ],
                    )
                    .await?;
                rows.iter()
                    .map(|row| {
                        upload_from_row(row).map_err(|error| {
                            unreadable_row(&row.try_get::<_, String>(0).unwrap_or_default(), error)
                        })
                    })
                    .collect()
            })
        })
        .await
    }

    pub(super) async fn retry_upload(&self, id: String) -> Result<bool, StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let update = connection
                    .prepare(concat!(
                        "UPDATE uploads SET state = 'received', attempts = 0, updated_at = $2, next_attempt_at = ",
                        db_now!(),
                        " WHERE id = $1 AND state = 'failed'"
                    ))
                    .await?;
                let changed = connection.client().execute(&update, &[&id, &now_ms()]).await?;
                Ok(changed == 1)
            })
        })
        .await
    }

    /// An upload by id, only if it belongs to `tenant`.
    pub(super) async fn upload_of(
        &self,
        tenant: String,
        id: String,
    ) -> Result<Option<UploadRecord>, StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let select = connection
                    .prepare(concat!(
                        "SELECT ",
                        upload_columns!(),
                        " FROM uploads WHERE id = $1 AND tenant = $2"
                    ))
                    .await?;
                let row = connection.client().query_opt(&select, &[&id, &tenant]).await?;
                row.as_ref().map(upload_from_row).transpose()
            })
        })
        .await
    }
}
