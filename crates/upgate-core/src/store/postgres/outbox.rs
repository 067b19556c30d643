//! The outbox: uploads in state `received` with a due time, claimed under a lease. Nodes
//! claim with `FOR UPDATE SKIP LOCKED`, so two polls never take the same upload.

use super::uploads::{upload_columns, upload_from_row};
use super::{PostgresStore, big, on_db_clock};
use crate::store::{Claim, StoreError, UNREADABLE_ROW_WAIT_MS};
use crate::vocab::now_ms;

impl PostgresStore {
    /// Records an async delivery: state forwarded, remote id and URL. Only an upload still
    /// waiting (`received`) under the claim ending at `lease_until` changes; `false` means
    /// it was deleted while it was in flight, or its lease ran out and another node claimed
    /// it. A note of a superseded delivery stays.
    pub(super) async fn mark_forwarded(
        &self,
        id: String,
        remote_id: String,
        remote_url: Option<String>,
        attempts: u32,
        lease_until: i64,
    ) -> Result<bool, StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let update = connection
                    .prepare(
                        "UPDATE uploads SET state = 'forwarded', remote_id = $2, remote_url = $3, attempts = $4,
                         last_error = CASE WHEN last_error LIKE 'superseded:%' THEN last_error END,
                         next_attempt_at = NULL, updated_at = $5
                         WHERE id = $1 AND state = 'received' AND next_attempt_at = $6",
                    )
                    .await?;
                let changed = connection
                    .client()
                    .execute(
                        &update,
                        &[&id, &remote_id, &remote_url, &i64::from(attempts), &now_ms(), &lease_until],
                    )
                    .await?;
                Ok(changed == 1)
            })
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
        let clock = self.node_clock;
        self.call(move |connection| {
            Box::pin(async move {
                let state = if retry_at_ms.is_some() {
                    "received"
                } else {
                    "failed"
                };
                let update = connection
                    .prepare(concat!(
                        "UPDATE uploads SET state = $2, last_error = $3, attempts = $4, updated_at = $6,
                         next_attempt_at = ",
                        on_db_clock!("$5", "$8"),
                        " WHERE id = $1 AND state = 'received' AND next_attempt_at = $7"
                    ))
                    .await?;
                let changed = connection
                    .client()
                    .execute(
                        &update,
                        &[
                            &id,
                            &state,
                            &error,
                            &i64::from(attempts),
                            &retry_at_ms,
                            &now_ms(),
                            &lease_until,
                            &clock(),
                        ],
                    )
                    .await?;
                Ok(changed == 1)
            })
        })
        .await
    }

    pub(super) async fn note_superseded(&self, id: String, note: String) -> Result<(), StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let update = connection
                    .prepare("UPDATE uploads SET last_error = $2 WHERE id = $1")
                    .await?;
                connection
                    .client()
                    .execute(&update, &[&id, &format!("superseded: {note}")])
                    .await?;
                Ok(())
            })
        })
        .await
    }

    /// Uploads due for delivery, claimed: their next attempt is pushed `lease_ms` ahead so no
    /// poll (of this node or another) picks them up while they are in flight. Due and lease
    /// are on PostgreSQL's clock (`now`, this node's, is moved onto it), so a node whose
    /// clock runs ahead does not claim early. Rows another node is claiming at this moment
    /// are skipped, not waited for. A row that cannot be read (another version's, one edited
    /// by hand) is put off ([`UNREADABLE_ROW_WAIT_MS`]) and named in a warning; the others
    /// are claimed as usual.
    pub(super) async fn claim_due(&self, now: i64, limit: usize, lease_ms: i64) -> Result<Claim, StoreError> {
        let clock = self.node_clock;
        self.call(move |connection| {
            Box::pin(async move {
                let claim = connection
                    .prepare(concat!(
                        "WITH due AS (
                            SELECT id AS due_id, next_attempt_at AS due_at FROM uploads
                            WHERE next_attempt_at IS NOT NULL AND state = 'received' AND next_attempt_at <= ",
                        on_db_clock!("$1", "$4"),
                        " ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED
                         )
                         UPDATE uploads SET next_attempt_at = ",
                        on_db_clock!("$1", "$4"),
                        " + $3::bigint FROM due WHERE id = due_id
                         RETURNING ",
                        upload_columns!(),
                        ", due_at, next_attempt_at"
                    ))
                    .await?;
                let rows = connection
                    .client()
                    .query(&claim, &[&now, &big(limit as u64), &lease_ms, &clock()])
                    .await?;
                let mut due = Vec::with_capacity(rows.len());
                let mut unreadable = Vec::new();
                for row in &rows {
                    match upload_from_row(row) {
                        Ok(record) => due.push((row.try_get::<_, i64>(17)?, record)),
                        Err(error) => {
                            let id: String = row.try_get(0)?;
                            tracing::warn!(upload_id = %id, %error,
                                "an outbox entry cannot be read; put off for an hour, the others go on");
                            unreadable.push(id);
                        }
                    }
                }
                if !unreadable.is_empty() {
                    let put_off = connection
                        .prepare(
                            "UPDATE uploads SET next_attempt_at = next_attempt_at + $2 WHERE id = ANY($1)",
                        )
                        .await?;
                    connection
                        .client()
                        .execute(&put_off, &[&unreadable, &UNREADABLE_ROW_WAIT_MS])
                        .await?;
                }
                // The same for every row (PostgreSQL's clock is fixed for the statement); with
                // none claimed, nothing presents it.
                let lease_until = match rows.first() {
                    Some(row) => row.try_get::<_, i64>(18)?,
                    None => now.saturating_add(lease_ms),
                };
                // Oldest due first, as they were chosen.
                due.sort_by(|(a, first), (b, second)| a.cmp(b).then_with(|| first.id.cmp(&second.id)));
                Ok(Claim {
                    due: due.into_iter().map(|(_, record)| record).collect(),
                    lease_until,
                })
            })
        })
        .await
    }

    /// Unlike SQLite's, this releases nothing: with a shared store the leases may be other
    /// live nodes' (making them due would deliver twice), so a dead node's leases run out by
    /// themselves, after the provider's timeout plus the lease margin.
    pub(super) async fn release_outbox_leases(&self) -> Result<usize, StoreError> {
        Ok(0)
    }

    /// Number of uploads waiting in the outbox.
    pub(super) async fn outbox_len(&self) -> Result<u64, StoreError> {
        self.call(|connection| {
            Box::pin(async move {
                let count = connection
                    .prepare("SELECT COUNT(*) FROM uploads WHERE next_attempt_at IS NOT NULL AND state = 'received'")
                    .await?;
                let row = connection.client().query_one(&count, &[]).await?;
                Ok(row.try_get::<_, i64>(0)? as u64)
            })
        })
        .await
    }
}
