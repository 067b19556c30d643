//! The `usage` table: bytes and uploads per tenant and day, for quotas shared by every node.

use super::{PostgresStore, big};
use crate::store::StoreError;

impl PostgresStore {
    /// Today's usage of a tenant: (bytes, uploads).
    pub(super) async fn usage(&self, tenant: String, day: i64) -> Result<(u64, u64), StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let select = connection
                    .prepare("SELECT bytes, uploads FROM usage WHERE tenant = $1 AND day = $2")
                    .await?;
                let row = connection.client().query_opt(&select, &[&tenant, &day]).await?;
                Ok(match row {
                    // Below zero (a row edited by hand) counts as nothing used.
                    Some(row) => (
                        row.try_get::<_, i64>(0)?.max(0) as u64,
                        row.try_get::<_, i64>(1)?.max(0) as u64,
                    ),
                    None => (0, 0),
                })
            })
        })
        .await
    }

    /// Adds to today's usage if it stays within the limits; returns false (adding nothing)
    /// when it would not. One statement: the insert, or the update of the row it conflicts
    /// with, guarded by the limits and evaluated under the row's lock, so nodes adding at
    /// once never pass a limit together.
    pub(super) async fn try_add_usage(
        &self,
        tenant: String,
        day: i64,
        bytes: u64,
        uploads: u64,
        limits: (Option<u64>, Option<u64>),
    ) -> Result<bool, StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let add = connection
                    .prepare(
                        "INSERT INTO usage AS used (tenant, day, bytes, uploads)
                         SELECT $1::text, $2::bigint, $3::bigint, $4::bigint
                         WHERE ($5::bigint IS NULL OR $3 <= $5) AND ($6::bigint IS NULL OR $4 <= $6)
                         ON CONFLICT (tenant, day) DO UPDATE
                         SET bytes = used.bytes + EXCLUDED.bytes, uploads = used.uploads + EXCLUDED.uploads
                         WHERE ($5 IS NULL OR used.bytes + EXCLUDED.bytes <= $5)
                         AND ($6 IS NULL OR used.uploads + EXCLUDED.uploads <= $6)",
                    )
                    .await?;
                let changed = connection
                    .client()
                    .execute(
                        &add,
                        &[
                            &tenant,
                            &day,
                            &big(bytes),
                            &big(uploads),
                            &limits.0.map(big),
                            &limits.1.map(big),
                        ],
                    )
                    .await?;
                Ok(changed == 1)
            })
        })
        .await
    }

    /// Gives back usage [`crate::store::Store::try_add_usage`] counted for uploads that
    /// were not kept.
    pub(super) async fn refund_usage(
        &self,
        tenant: String,
        day: i64,
        bytes: u64,
        uploads: u64,
    ) -> Result<(), StoreError> {
        self.call(move |connection| {
            Box::pin(async move {
                let refund = connection
                    .prepare(
                        "UPDATE usage SET bytes = GREATEST(0, bytes - $3), uploads = GREATEST(0, uploads - $4)
                         WHERE tenant = $1 AND day = $2",
                    )
                    .await?;
                connection
                    .client()
                    .execute(&refund, &[&tenant, &day, &big(bytes), &big(uploads)])
                    .await?;
                Ok(())
            })
        })
        .await
    }
}
