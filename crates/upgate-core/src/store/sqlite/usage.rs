//! The `usage` table: bytes and uploads per tenant and day, for quotas.

use rusqlite::{OptionalExtension, params};

use super::SqliteStore;
use crate::store::StoreError;

/// A `usage` row's (bytes, uploads). A count below zero (a row edited by hand) counts as
/// nothing used rather than as the most there is.
fn used(row: &rusqlite::Row<'_>) -> rusqlite::Result<(u64, u64)> {
    Ok((
        row.get::<_, i64>(0)?.max(0) as u64,
        row.get::<_, i64>(1)?.max(0) as u64,
    ))
}

impl SqliteStore {
    /// Today's usage of a tenant: (bytes, uploads).
    pub(super) async fn usage(&self, tenant: String, day: i64) -> Result<(u64, u64), StoreError> {
        self.call(move |connection| {
            Ok(connection
                .query_row(
                    "SELECT bytes, uploads FROM usage WHERE tenant = ?1 AND day = ?2",
                    params![tenant, day],
                    used,
                )
                .optional()?
                .unwrap_or((0, 0)))
        })
        .await
    }

    /// Adds to today's usage if it stays within the limits; returns false (adding nothing)
    /// when it would not.
    pub(super) async fn try_add_usage(
        &self,
        tenant: String,
        day: i64,
        bytes: u64,
        uploads: u64,
        limits: (Option<u64>, Option<u64>),
    ) -> Result<bool, StoreError> {
        self.call(move |connection| {
            let (used_bytes, used_uploads): (u64, u64) = connection
                .query_row(
                    "SELECT bytes, uploads FROM usage WHERE tenant = ?1 AND day = ?2",
                    params![tenant, day],
                    used,
                )
                .optional()?
                .unwrap_or((0, 0));
            let over_bytes = limits
                .0
                .is_some_and(|limit| used_bytes.saturating_add(bytes) > limit);
            let over_uploads = limits
                .1
                .is_some_and(|limit| used_uploads.saturating_add(uploads) > limit);
            if over_bytes || over_uploads {
                return Ok(false);
            }
            connection.execute(
                "INSERT INTO usage (tenant, day, bytes, uploads) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (tenant, day) DO UPDATE SET bytes = bytes + ?3, uploads = uploads + ?4",
                params![tenant, day, bytes as i64, uploads as i64],
            )?;
            Ok(true)
        })
        .await
    }

    /// Gives back usage [`Store::try_add_usage`] counted for uploads that were not kept.
    pub(super) async fn refund_usage(
        &self,
        tenant: String,
        day: i64,
        bytes: u64,
        uploads: u64,
    ) -> Result<(), StoreError> {
        self.call(move |connection| {
            connection.execute(
                "UPDATE usage SET bytes = max(0, bytes - ?3), uploads = max(0, uploads - ?4)
                 WHERE tenant = ?1 AND day = ?2",
                params![tenant, day, bytes as i64, uploads as i64],
            )?;
            Ok(())
        })
        .await
    }
}
