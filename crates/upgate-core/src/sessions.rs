//! Chunked upload sessions: chunk files on disk, session rows in SQLite, and the sweeper.
//!
//! What flows through here: chunks of a session written to
//! `<data_dir>/sessions/<session id>/<chunk number>` (ids are upgate's uuids, numbers are
//! integers: nothing from a client becomes a path), their sizes recorded in SQLite so a
//! restart loses nothing; at completion the chunks streamed in order through one
//! [`SpoolWriter`] into an ordinary spooled upload. The housekeeping task deletes expired
//! sessions and their chunks and keeps the gauges (sessions, spool bytes, free disk) fresh.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::ServerConfig;
use crate::gateway::Gateway;
use crate::metrics;
use crate::store::now_ms;

/// Where a session's chunks live.
pub fn session_dir(data_dir: &std::path::Path, session_id: &str) -> PathBuf {
    data_dir.join("sessions").join(session_id)
}

/// Sweeps expired sessions and refreshes gauges every `sweep_interval`.
pub async fn run_housekeeping(gateway: Arc<Gateway>, server: ServerConfig) {
    loop {
        match gateway.store.take_expired_sessions(now_ms()).await {
            Ok(expired) => {
                for id in expired {
                    let _ = tokio::fs::remove_dir_all(session_dir(&gateway.data_dir, &id)).await;
                    tracing::info!(session_id = %id, "expired session swept");
                }
            }
            Err(error) => tracing::error!(%error, "session sweep failed"),
        }
        if let Ok(active) = gateway.store.active_sessions().await {
            metrics::get().sessions_active.set(active as i64);
        }
        let spool = gateway.spool.clone();
        let data_dir = gateway.data_dir.clone();
        let floor = server.disk_free_floor.0;
        let _ = tokio::task::spawn_blocking(move || {
            metrics::get().spool_bytes.set(spool.bytes_on_disk() as i64);
            metrics::watch_disk(&data_dir, floor);
        })
        .await;
        tokio::time::sleep(server.sweep_interval.0.min(std::time::Duration::from_secs(60))).await;
    }
}
