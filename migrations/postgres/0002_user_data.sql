-- Settings and preferences: one JSON object per user, versioned like
-- profiles (every UPDATE bumps `version`; the cache orders writes by it).
CREATE TABLE IF NOT EXISTS settings (
    user_id     UUID PRIMARY KEY,
    data        JSONB NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    version     BIGINT NOT NULL DEFAULT 1
);

CREATE TABLE IF NOT EXISTS preferences (
    user_id     UUID PRIMARY KEY,
    data        JSONB NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    version     BIGINT NOT NULL DEFAULT 1
);

-- Sessions, one per `sid` claim. `key_id` is the session's cache id (the
-- sid itself when it is a plain id, else its hex form); `expires_at` is
-- the latest `exp` seen among the session's tokens (unix seconds).
CREATE TABLE IF NOT EXISTS sessions (
    key_id      TEXT PRIMARY KEY,
    sid         TEXT NOT NULL,
    user_sub    TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_seen   TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at  BIGINT NOT NULL,
    user_agent  TEXT,
    version     BIGINT NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS sessions_user_idx ON sessions (user_sub, created_at);
CREATE INDEX IF NOT EXISTS sessions_expires_idx ON sessions (expires_at);

-- Revoked tokens (`jti`) and sessions (`sid`): kept until `expires_at`
-- (unix seconds), then pruned. `key_id` is the cache id: `jti-<jti>` or
-- `sid-<sid>` (`jtix-`/`sidx-` and hex for ids outside the key alphabet).
CREATE TABLE IF NOT EXISTS revocations (
    key_id      TEXT PRIMARY KEY,
    scope       TEXT NOT NULL,
    token_id    TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    revoked_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    version     BIGINT NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS revocations_expires_idx ON revocations (expires_at);
