-- User profiles: the system of record the profile cache reads through.
CREATE TABLE IF NOT EXISTS profiles (
    id          UUID PRIMARY KEY,
    user_id     UUID NOT NULL UNIQUE,
    first_name  TEXT,
    last_name   TEXT,
    name        TEXT,
    email       TEXT,
    phone       TEXT,
    address     TEXT,
    last_login  TIMESTAMPTZ,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Bumped by every UPDATE in the statement that returns the row; the
    -- cache orders writes by it.
    version     BIGINT NOT NULL DEFAULT 1
);

-- Warming selects the users active in the last days, most recent first.
CREATE INDEX IF NOT EXISTS profiles_last_login_idx ON profiles (last_login DESC);
