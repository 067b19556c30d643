//! The schema, as versioned migrations recorded in `schema_version`, safe when several nodes
//! start at once: each takes the advisory lock [`MIGRATION_LOCK`] first, so one migrates and
//! the others wait, then find nothing left to do.

use tokio_postgres::Client;

use crate::store::StoreError;
use crate::vocab::now_ms;

/// The advisory lock key migrations hold (`upgate` in ASCII).
pub(super) const MIGRATION_LOCK: i64 = 0x7570_6761_7465;

/// How long a node waits for another's migration (and a migration may run).
const MIGRATION_TIMEOUT: &str = "5min";

/// Migrations, applied in order; index + 1 is the schema version after it. Version 1 is
/// the SQLite schema at its version 6 (uploads, outbox, sessions with resumable uploads,
/// usage), in PostgreSQL's types.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: uploads and the outbox, chunked and resumable sessions, daily usage.
    "CREATE TABLE uploads (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        dialect TEXT NOT NULL,
        filename TEXT NOT NULL,
        extension TEXT NOT NULL,
        mime TEXT NOT NULL,
        size BIGINT NOT NULL,
        sha256 TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('received', 'forwarded', 'failed', 'deleted')),
        provider TEXT NOT NULL,
        remote_id TEXT,
        remote_url TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        attempts BIGINT NOT NULL DEFAULT 0,
        last_error TEXT,
        next_attempt_at BIGINT
    );
    CREATE INDEX uploads_outbox ON uploads (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        dialect TEXT NOT NULL,
        filename TEXT NOT NULL,
        extension TEXT NOT NULL,
        declared_size BIGINT NOT NULL,
        total_chunks BIGINT NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        length_deferred BOOLEAN NOT NULL DEFAULT FALSE,
        concat TEXT CHECK (concat IN ('partial', 'final')),
        upload_id TEXT
    );
    CREATE INDEX sessions_expiry ON sessions (expires_at);
    CREATE TABLE session_chunks (
        session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        chunk_number BIGINT NOT NULL,
        size BIGINT NOT NULL,
        PRIMARY KEY (session_id, chunk_number)
    );
    CREATE TABLE usage (
        tenant TEXT NOT NULL,
        day BIGINT NOT NULL,
        bytes BIGINT NOT NULL DEFAULT 0,
        uploads BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, day)
    );",
    // 2: state `delivering` (a sync delivery in progress, under a lease in next_attempt_at).
    "ALTER TABLE uploads DROP CONSTRAINT uploads_state_check;
    ALTER TABLE uploads ADD CONSTRAINT uploads_state_check
        CHECK (state IN ('received', 'delivering', 'forwarded', 'failed', 'deleted'));",
    // 3: leases on sessions, so that one node at a time works on a session (its holder, and
    // when a holder that died stops counting).
    "CREATE TABLE session_leases (
        session_id TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until_ms BIGINT NOT NULL
    );",
    // 4: the partial uploads a final concatenation joined (tus HEAD names them).
    "ALTER TABLE sessions ADD COLUMN concat_parts TEXT;",
    // 5: a tenant's unfinished sessions, counted at every session start and tus creation
    // (`max_open_sessions`) while finished tus uploads stay until they expire.
    "CREATE INDEX sessions_open_by_tenant ON sessions (tenant) WHERE upload_id IS NULL;",
    // 6: the store's identity, drawn once: which shared spool prefix is this store's
    // (`Store::identity`).
    "CREATE TABLE store_identity (id TEXT PRIMARY KEY);
    INSERT INTO store_identity VALUES (md5(random()::text || clock_timestamp()::text));",
];

/// Brings the schema up to date under the migration lock; returns how many migrations this
/// call applied (0 when another node had done them).
pub(super) async fn migrate(client: &mut Client) -> Result<usize, StoreError> {
    client
        .batch_execute(&format!(
            "SET statement_timeout = '{MIGRATION_TIMEOUT}'; SELECT pg_advisory_lock({MIGRATION_LOCK})"
        ))
        .await?;
    let migrated = migrate_locked(client).await;
    // The lock also goes with the session; unlocking keeps this connection for the pool.
    let unlocked = client
        .batch_execute(&format!(
            "SELECT pg_advisory_unlock({MIGRATION_LOCK}); RESET statement_timeout"
        ))
        .await;
    let applied = migrated?;
    unlocked?;
    Ok(applied)
}

async fn migrate_locked(client: &mut Client) -> Result<usize, StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_version (
                version BIGINT PRIMARY KEY,
                applied_at BIGINT NOT NULL
            )",
        )
        .await?;
    let current = current_version(client).await?;
    let mut applied = 0;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(current) {
        let transaction = client.transaction().await?;
        transaction.batch_execute(migration).await?;
        transaction
            .execute(
                "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                &[&((index + 1) as i64), &now_ms()],
            )
            .await?;
        transaction.commit().await?;
        applied += 1;
        tracing::info!(version = index + 1, "PostgreSQL schema migrated");
    }
    Ok(applied)
}

/// The schema version recorded, refused if it is newer than this upgate knows.
async fn current_version(client: &Client) -> Result<usize, StoreError> {
    let version: i64 = client
        .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])
        .await?
        .try_get(0)?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        return Err(StoreError::Database(format!(
            "the database's schema version {version} is newer than this upgate's ({}): upgrade upgate",
            MIGRATIONS.len()
        )));
    }
    Ok(version)
}

/// The schema version of a database (0 if upgate never migrated it), without changing it.
pub(super) async fn check_version(client: &Client) -> Result<usize, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(0);
    }
    current_version(client).await
}
