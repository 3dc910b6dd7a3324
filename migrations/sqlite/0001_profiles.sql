-- User profiles: the system of record the profile cache reads through.
-- UUIDs are stored as lowercase hyphenated text and timestamps as
-- fixed-width RFC 3339 UTC text ("2025-01-01T00:00:00.000000Z"), so that
-- text order is time order.
CREATE TABLE IF NOT EXISTS profiles (
    id          TEXT PRIMARY KEY NOT NULL,
    user_id     TEXT NOT NULL UNIQUE,
    first_name  TEXT,
    last_name   TEXT,
    name        TEXT,
    email       TEXT,
    phone       TEXT,
    address     TEXT,
    last_login  TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    version     INTEGER NOT NULL DEFAULT 1
);

CREATE INDEX IF NOT EXISTS profiles_last_login_idx ON profiles (last_login DESC);
