-- Row versions are never negative in the tables kura owns: the cache
-- orders writes by them, and the invalidation feed reads them as unsigned.
-- SQLite cannot add a CHECK constraint to a table, so two triggers per
-- table refuse such a write with the same message a CHECK gives.

CREATE TRIGGER IF NOT EXISTS profiles_version_not_negative_insert
BEFORE INSERT ON profiles WHEN NEW.version < 0
BEGIN
    SELECT RAISE(ABORT, 'CHECK constraint failed: profiles.version >= 0');
END;

CREATE TRIGGER IF NOT EXISTS profiles_version_not_negative_update
BEFORE UPDATE ON profiles WHEN NEW.version < 0
BEGIN
    SELECT RAISE(ABORT, 'CHECK constraint failed: profiles.version >= 0');
END;

CREATE TRIGGER IF NOT EXISTS settings_version_not_negative_insert
BEFORE INSERT ON settings WHEN NEW.version < 0
BEGIN
    SELECT RAISE(ABORT, 'CHECK constraint failed: settings.version >= 0');
END;

CREATE TRIGGER IF NOT EXISTS settings_version_not_negative_update
BEFORE UPDATE ON settings WHEN NEW.version < 0
BEGIN
    SELECT RAISE(ABORT, 'CHECK constraint failed: settings.version >= 0');
END;

CREATE TRIGGER IF NOT EXISTS preferences_version_not_negative_insert
BEFORE INSERT ON preferences WHEN NEW.version < 0
BEGIN
    SELECT RAISE(ABORT, 'CHECK constraint failed: preferences.version >= 0');
END;

CREATE TRIGGER IF NOT EXISTS preferences_version_not_negative_update
BEFORE UPDATE ON preferences WHEN NEW.version < 0
BEGIN
    SELECT RAISE(ABORT, 'CHECK constraint failed: preferences.version >= 0');
END;

CREATE TRIGGER IF NOT EXISTS sessions_version_not_negative_insert
BEFORE INSERT ON sessions WHEN NEW.version < 0
BEGIN
    SELECT RAISE(ABORT, 'CHECK constraint failed: sessions.version >= 0');
END;

CREATE TRIGGER IF NOT EXISTS sessions_version_not_negative_update
BEFORE UPDATE ON sessions WHEN NEW.version < 0
BEGIN
    SELECT RAISE(ABORT, 'CHECK constraint failed: sessions.version >= 0');
END;

CREATE TRIGGER IF NOT EXISTS revocations_version_not_negative_insert
BEFORE INSERT ON revocations WHEN NEW.version < 0
BEGIN
    SELECT RAISE(ABORT, 'CHECK constraint failed: revocations.version >= 0');
END;

CREATE TRIGGER IF NOT EXISTS revocations_version_not_negative_update
BEFORE UPDATE ON revocations WHEN NEW.version < 0
BEGIN
    SELECT RAISE(ABORT, 'CHECK constraint failed: revocations.version >= 0');
END;
