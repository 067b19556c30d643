//! The outbox: uploads in state `received` with a due time, claimed under a lease.

use rusqlite::params;

use super::SqliteStore;
use super::uploads::{UPLOAD_COLUMNS, upload_from_row};
use crate::store::{Claim, StoreError, UNREADABLE_ROW_WAIT_MS};
use crate::vocab::now_ms;

impl SqliteStore {
    /// Records an async delivery: state forwarded, remote id and URL. Only an upload still
    /// waiting (`received`) under the claim ending at `lease_until` changes; `false` means it
    /// was deleted while it was in flight, or claimed again. A note of a superseded
    /// delivery stays.
    pub(super) async fn mark_forwarded(
        &self,
        id: String,
        remote_id: String,
        remote_url: Option<String>,
        attempts: u32,
        lease_until: i64,
    ) -> Result<bool, StoreError> {
        self.call(move |connection| {
            let changed = connection.execute(
                "UPDATE uploads SET state = 'forwarded', remote_id = ?2, remote_url = ?3, attempts = ?4,
                 last_error = CASE WHEN last_error LIKE 'superseded:%' THEN last_error END,
                 next_attempt_at = NULL, leased = 0, updated_at = ?5
                 WHERE id = ?1 AND state = 'received' AND next_attempt_at = ?6",
                params![id, remote_id, remote_url, attempts, now_ms(), lease_until],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    /// Records a failed attempt of an upload still waiting (a deleted one stays deleted).
    /// With `retry_at`, the upload stays `received` and in the outbox; without, it is
    /// `failed` for good.
    pub(super) async fn mark_attempt_failed(
        &self,
        id: String,
        error: String,
        attempts: u32,
        retry_at_ms: Option<i64>,
        lease_until: i64,
    ) -> Result<bool, StoreError> {
        self.call(move |connection| {
            let state = if retry_at_ms.is_some() {
                "received"
            } else {
                "failed"
            };
            let changed = connection.execute(
                "UPDATE uploads SET state = ?2, last_error = ?3, attempts = ?4, next_attempt_at = ?5,
                 leased = 0, updated_at = ?6 WHERE id = ?1 AND state = 'received' AND next_attempt_at = ?7",
                params![id, state, error, attempts, retry_at_ms, now_ms(), lease_until],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    pub(super) async fn note_superseded(&self, id: String, note: String) -> Result<(), StoreError> {
        self.call(move |connection| {
            connection.execute(
                "UPDATE uploads SET last_error = ?2 WHERE id = ?1",
                params![id, format!("superseded: {note}")],
            )?;
            Ok(())
        })
        .await
    }

    /// Uploads due for delivery, claimed: their next attempt is pushed `lease_ms` ahead so a
    /// second poll does not pick them up while they are in flight. A row that cannot be read
    /// is not claimed but put off ([`UNREADABLE_ROW_WAIT_MS`]) and named in a warning: it
    /// never holds up the uploads due after it.
    pub(super) async fn claim_due(&self, now: i64, limit: usize, lease_ms: i64) -> Result<Claim, StoreError> {
        let lease_until = now.saturating_add(lease_ms);
        self.call(move |connection| {
            let mut statement = connection.prepare_cached(&format!(
                "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE next_attempt_at IS NOT NULL
                 AND next_attempt_at <= ?1 AND state = 'received' ORDER BY next_attempt_at LIMIT ?2"
            ))?;
            let rows = statement
                .query_map(params![now, limit as i64], |row| {
                    Ok((row.get::<_, rusqlite::types::Value>(0)?, upload_from_row(row)))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let mut lease = connection
                .prepare_cached("UPDATE uploads SET next_attempt_at = ?2, leased = 1 WHERE id = ?1")?;
            let mut due = Vec::with_capacity(rows.len());
            for (id, read) in rows {
                match read {
                    Ok(record) => {
                        lease.execute(params![id, lease_until])?;
                        due.push(record);
                    }
                    Err(error) => {
                        tracing::warn!(upload_id = ?id, %error,
                            "an outbox entry cannot be read; put off for an hour, the others go on");
                        connection.execute(
                            "UPDATE uploads SET next_attempt_at = ?2, leased = 0 WHERE id = ?1",
                            params![id, now.saturating_add(UNREADABLE_ROW_WAIT_MS)],
                        )?;
                    }
                }
            }
            Ok(Claim { due, lease_until })
        })
        .await
    }

    /// At start: the leases of a previous process are void (nothing of it is in flight any
    /// more), so every upload it had claimed is due now instead of when its lease would run
    /// out, and every sync delivery's lease has ended. An upload waiting out a retry's backoff
    /// keeps its time (a daemon restarting in a loop does not send them all again each time).
    pub(super) async fn release_outbox_leases(&self) -> Result<usize, StoreError> {
        self.call(|connection| {
            Ok(connection.execute(
                "UPDATE uploads SET next_attempt_at = ?1, leased = 0
                 WHERE ((state = 'received' AND leased = 1) OR state = 'delivering')
                 AND next_attempt_at IS NOT NULL AND next_attempt_at > ?1",
                params![now_ms()],
            )?)
        })
        .await
    }

    /// Number of uploads waiting in the outbox.
    pub(super) async fn outbox_len(&self) -> Result<u64, StoreError> {
        self.call(|connection| {
            Ok(connection.query_row(
                "SELECT COUNT(*) FROM uploads WHERE next_attempt_at IS NOT NULL AND state = 'received'",
                [],
                |row| row.get::<_, i64>(0),
            )? as u64)
        })
        .await
    }
}
