-- Settings and preferences: one JSON object per user (as text), versioned
-- like profiles. UUIDs and timestamps as in 0001.
CREATE TABLE IF NOT EXISTS settings (
    user_id     TEXT PRIMARY KEY NOT NULL,
    data        TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    version     INTEGER NOT NULL DEFAULT 1
);

CREATE TABLE IF NOT EXISTS preferences (
    user_id     TEXT PRIMARY KEY NOT NULL,
    data        TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    version     INTEGER NOT NULL DEFAULT 1
);

-- Sessions, one per `sid` claim (see the PostgreSQL migration).
CREATE TABLE IF NOT EXISTS sessions (
    key_id      TEXT PRIMARY KEY NOT NULL,
    sid         TEXT NOT NULL,
    user_sub    TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    last_seen   TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    user_agent  TEXT,
    version     INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS sessions_user_idx ON sessions (user_sub, created_at);
CREATE INDEX IF NOT EXISTS sessions_expires_idx ON sessions (expires_at);

-- Revoked tokens and sessions (see the PostgreSQL migration).
CREATE TABLE IF NOT EXISTS revocations (
    key_id      TEXT PRIMARY KEY NOT NULL,
    scope       TEXT NOT NULL,
    token_id    TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    revoked_at  TEXT NOT NULL,
    version     INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS revocations_expires_idx ON revocations (expires_at);
