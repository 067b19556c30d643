//! The `uploads` table: one row per upload, its state and its delivery.

use rusqlite::{OptionalExtension, params};

use super::{SqliteStore, id_text, parse_column, unreadable, unsigned};
use crate::store::{StoreError, UploadFilter, UploadRecord, UploadState, stored_metadata, unreadable_row};
use crate::vocab::{DialectName, now_ms};

pub(super) const UPLOAD_COLUMNS: &str = "id, tenant, dialect, filename, extension, mime, size, sha256, state, provider, \
     remote_id, remote_url, metadata, attempts, last_error, created_at, updated_at";

pub(super) fn upload_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<UploadRecord> {
    let metadata: String = row.get(12)?;
    Ok(UploadRecord {
        id: row.get(0)?,
        tenant: row.get(1)?,
        dialect: parse_column(2, &row.get::<_, String>(2)?, DialectName::parse)?,
        filename: row.get(3)?,
        extension: row.get(4)?,
        mime: row.get(5)?,
        size: unsigned(row, 6)?,
        sha256: row.get(7)?,
        state: parse_column(8, &row.get::<_, String>(8)?, UploadState::parse)?,
        provider: row.get(9)?,
        remote_id: row.get(10)?,
        remote_url: row.get(11)?,
        metadata: unreadable(12, stored_metadata(&metadata))?,
        attempts: unsigned(row, 13)?,
        last_error: row.get(14)?,
        created_at_ms: row.get(15)?,
        updated_at_ms: row.get(16)?,
    })
}

impl SqliteStore {
    /// Inserts upload records. Those in state `received` enter the outbox, due at `due_ms`;
    /// those `delivering` are leased until `due_ms`; the others do not wait for anything.
    pub(super) async fn insert_uploads(
        &self,
        records: Vec<UploadRecord>,
        due_ms: i64,
    ) -> Result<(), StoreError> {
        self.call(move |connection| {
            let mut statement = connection.prepare_cached(
                "INSERT INTO uploads (id, tenant, dialect, filename, extension, mime, size, sha256, state,
                 provider, remote_id, remote_url, metadata, attempts, last_error, created_at, updated_at,
                 next_attempt_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)",
            )?;
            for record in &records {
                statement.execute(params![
                    record.id,
                    record.tenant,
                    record.dialect.as_str(),
                    record.filename,
                    record.extension,
                    record.mime,
                    record.size as i64,
                    record.sha256,
                    record.state.as_str(),
                    record.provider,
                    record.remote_id,
                    record.remote_url,
                    serde_json::Value::Object(record.metadata.clone()).to_string(),
                    record.attempts,
                    record.last_error,
                    record.created_at_ms,
                    record.updated_at_ms,
                    record.state.waits().then_some(due_ms),
                ])?;
            }
            Ok(())
        })
        .await
    }

    /// Writes sync deliveries' outcomes over their `delivering` records.
    pub(super) async fn record_outcomes(&self, records: Vec<UploadRecord>) -> Result<usize, StoreError> {
        self.call(move |connection| {
            let mut statement = connection.prepare_cached(
                "UPDATE uploads SET state = ?2, remote_id = ?3, remote_url = ?4, attempts = ?5,
                 last_error = ?6, next_attempt_at = NULL, updated_at = ?7 WHERE id = ?1 AND state = 'delivering'",
            )?;
            let mut changed = 0;
            for record in &records {
                changed += statement.execute(params![
                    record.id,
                    record.state.as_str(),
                    record.remote_id,
                    record.remote_url,
                    record.attempts,
                    record.last_error,
                    now_ms(),
                ])?;
            }
            Ok(changed)
        })
        .await
    }

    /// Fails the sync deliveries whose lease ended before `now`.
    pub(super) async fn fail_interrupted_deliveries(
        &self,
        now: i64,
        reason: String,
    ) -> Result<Vec<UploadRecord>, StoreError> {
        self.call(move |connection| {
            let mut statement = connection.prepare_cached(&format!(
                "UPDATE uploads SET state = 'failed', last_error = ?2, next_attempt_at = NULL, updated_at = ?1
                 WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= ?1 AND state = 'delivering'
                 RETURNING {UPLOAD_COLUMNS}"
            ))?;
            // Each failed either way; one that cannot be read is named, not returned (its quota
            // stays counted), and never keeps the others from failing.
            let failed = statement
                .query_map(params![now, reason], |row| {
                    Ok((row.get::<_, rusqlite::types::Value>(0)?, upload_from_row(row)))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(failed
                .into_iter()
                .filter_map(|(id, read)| {
                    read.inspect_err(|error| {
                        tracing::warn!(upload_id = ?id, %error, "an interrupted delivery's row cannot be read")
                    })
                    .ok()
                })
                .collect())
        })
        .await
    }

    /// Ids of the uploads whose bytes belong in the spool: waiting for async delivery, or
    /// failed after it (kept for the operator).
    pub(super) async fn spooled_ids(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        self.call(|connection| {
            let mut statement =
                connection.prepare_cached("SELECT id FROM uploads WHERE state IN ('received', 'failed')")?;
            Ok(statement
                .query_map([], |row| row.get(0))?
                .collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(super) async fn mark_deleted(&self, id: String) -> Result<bool, StoreError> {
        self.call(move |connection| {
            let changed = connection.execute(
                "UPDATE uploads SET state = 'deleted', next_attempt_at = NULL, updated_at = ?2
                 WHERE id = ?1 AND state != 'deleted'",
                params![id, now_ms()],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    /// An upload by id, whoever's it is (operator commands).
    pub(super) async fn upload(&self, id: String) -> Result<Option<UploadRecord>, StoreError> {
        self.call(move |connection| {
            Ok(connection
                .query_row(
                    &format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = ?1"),
                    params![id],
                    upload_from_row,
                )
                .optional()?)
        })
        .await
    }

    pub(super) async fn list_uploads(&self, filter: UploadFilter) -> Result<Vec<UploadRecord>, StoreError> {
        self.call(move |connection| {
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {UPLOAD_COLUMNS} FROM uploads
                 WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR tenant = ?2) AND (?3 IS NULL OR created_at >= ?3)
                 ORDER BY created_at DESC, id DESC LIMIT ?4"
            ))?;
            let rows = statement.query_map(
                params![
                    filter.state.map(UploadState::as_str),
                    filter.tenant,
                    filter.since_ms,
                    filter.limit.min(i64::MAX as usize) as i64
                ],
                |row| Ok((row.get::<_, rusqlite::types::Value>(0)?, upload_from_row(row))),
            )?;
            rows.map(|read| {
                let (id, record) = read?;
                record.map_err(|error| unreadable_row(&id_text(&id), error))
            })
            .collect()
        })
        .await
    }

    pub(super) async fn retry_upload(&self, id: String) -> Result<bool, StoreError> {
        self.call(move |connection| {
            let now = now_ms();
            let changed = connection.execute(
                "UPDATE uploads SET state = 'received', next_attempt_at = ?2, leased = 0, attempts = 0, updated_at = ?2
                 WHERE id = ?1 AND state = 'failed'",
                params![id, now],
            )?;
            Ok(changed == 1)
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
            Ok(connection
                .query_row(
                    &format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = ?1 AND tenant = ?2"),
                    params![id, tenant],
                    upload_from_row,
                )
                .optional()?)
        })
        .await
    }
}
