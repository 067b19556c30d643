//! The schema, as versioned migrations keyed on `PRAGMA user_version`.

/// Migrations, applied in order; index + 1 is the schema version after it.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: uploads.
    "CREATE TABLE uploads (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        dialect TEXT NOT NULL,
        filename TEXT NOT NULL,
        extension TEXT NOT NULL,
        mime TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state IN ('received', 'forwarded', 'failed', 'deleted')),
        provider TEXT NOT NULL,
        remote_id TEXT,
        remote_url TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    ) WITHOUT ROWID;",
    // 2: delivery bookkeeping and the outbox.
    "ALTER TABLE uploads ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE uploads ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE uploads ADD COLUMN last_error TEXT;
    ALTER TABLE uploads ADD COLUMN next_attempt_at INTEGER;
    CREATE INDEX uploads_outbox ON uploads (next_attempt_at) WHERE next_attempt_at IS NOT NULL;",
    // 3: chunked sessions.
    "CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        dialect TEXT NOT NULL,
        filename TEXT NOT NULL,
        extension TEXT NOT NULL,
        declared_size INTEGER NOT NULL,
        total_chunks INTEGER NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL
    );
    CREATE INDEX sessions_expiry ON sessions (expires_at);
    CREATE TABLE session_chunks (
        session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        chunk_number INTEGER NOT NULL,
        size INTEGER NOT NULL,
        PRIMARY KEY (session_id, chunk_number)
    );",
    // 4: daily usage per tenant, for quotas.
    "CREATE TABLE usage (
        tenant TEXT NOT NULL,
        day INTEGER NOT NULL,
        bytes INTEGER NOT NULL DEFAULT 0,
        uploads INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant, day)
    );",
    // 5: the state check spelled with `=`: SQLite evaluates `state IN (...)` by building a
    // throw-away b-tree for the list on every insert and update, which was half the cost of
    // recording an upload. SQLite cannot alter a CHECK, so the table is rebuilt.
    "CREATE TABLE uploads_v5 (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        dialect TEXT NOT NULL,
        filename TEXT NOT NULL,
        extension TEXT NOT NULL,
        mime TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state = 'received' OR state = 'forwarded' OR state = 'failed'
            OR state = 'deleted'),
        provider TEXT NOT NULL,
        remote_id TEXT,
        remote_url TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        next_attempt_at INTEGER
    ) WITHOUT ROWID;
    INSERT INTO uploads_v5 (id, tenant, dialect, filename, extension, mime, size, sha256, state,
        provider, remote_id, remote_url, created_at, updated_at, metadata, attempts, last_error,
        next_attempt_at)
    SELECT id, tenant, dialect, filename, extension, mime, size, sha256, state, provider,
        remote_id, remote_url, created_at, updated_at, metadata, attempts, last_error,
        next_attempt_at
    FROM uploads;
    DROP TABLE uploads;
    ALTER TABLE uploads_v5 RENAME TO uploads;
    CREATE INDEX uploads_outbox ON uploads (next_attempt_at) WHERE next_attempt_at IS NOT NULL;",
    // 6: resumable uploads (tus) as sessions of one growing chunk.
    "ALTER TABLE sessions ADD COLUMN length_deferred INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sessions ADD COLUMN concat TEXT;
    ALTER TABLE sessions ADD COLUMN upload_id TEXT;",
    // 7: state `delivering` (a sync delivery in progress, under a lease in next_attempt_at).
    // SQLite cannot alter a CHECK: the table is rebuilt, as in 5.
    "CREATE TABLE uploads_v7 (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        dialect TEXT NOT NULL,
        filename TEXT NOT NULL,
        extension TEXT NOT NULL,
        mime TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        state TEXT NOT NULL CHECK (state = 'received' OR state = 'delivering' OR state = 'forwarded'
            OR state = 'failed' OR state = 'deleted'),
        provider TEXT NOT NULL,
        remote_id TEXT,
        remote_url TEXT,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL,
        metadata TEXT NOT NULL DEFAULT '{}',
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        next_attempt_at INTEGER
    ) WITHOUT ROWID;
    INSERT INTO uploads_v7 SELECT id, tenant, dialect, filename, extension, mime, size, sha256,
        state, provider, remote_id, remote_url, created_at, updated_at, metadata, attempts,
        last_error, next_attempt_at FROM uploads;
    DROP TABLE uploads;
    ALTER TABLE uploads_v7 RENAME TO uploads;
    CREATE INDEX uploads_outbox ON uploads (next_attempt_at) WHERE next_attempt_at IS NOT NULL;",
    // Version 8: whether `next_attempt_at` is an outbox claim's lease (1) or a due time (0), so
    // that a start voids the leases of the process before without undoing retry backoffs.
    "ALTER TABLE uploads ADD COLUMN leased INTEGER NOT NULL DEFAULT 0;",
    // Version 9: the partial uploads a final concatenation joined (tus HEAD names them).
    "ALTER TABLE sessions ADD COLUMN concat_parts TEXT;",
    // Version 10: a tenant's unfinished sessions, counted at every session start and tus
    // creation (`max_open_sessions`) while finished tus uploads stay until they expire.
    "CREATE INDEX sessions_open_by_tenant ON sessions (tenant) WHERE upload_id IS NULL;",
    // Version 11: the store's identity, drawn once: which shared spool prefix is this
    // store's (`Store::identity`).
    "CREATE TABLE store_identity (id TEXT PRIMARY KEY NOT NULL) WITHOUT ROWID;
    INSERT INTO store_identity VALUES (lower(hex(randomblob(16))));",
];
