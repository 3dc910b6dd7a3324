-- Row versions are never negative in the tables kura owns: the cache
-- orders writes by them, and the invalidation feed reads them as unsigned.
-- NOT VALID: enforced on every new write, without failing a database whose
-- existing rows break the rule (the feed still invalidates those without a
-- version).
ALTER TABLE profiles ADD CONSTRAINT profiles_version_not_negative CHECK (version >= 0) NOT VALID;
ALTER TABLE settings ADD CONSTRAINT settings_version_not_negative CHECK (version >= 0) NOT VALID;
ALTER TABLE preferences ADD CONSTRAINT preferences_version_not_negative CHECK (version >= 0) NOT VALID;
ALTER TABLE sessions ADD CONSTRAINT sessions_version_not_negative CHECK (version >= 0) NOT VALID;
ALTER TABLE revocations ADD CONSTRAINT revocations_version_not_negative CHECK (version >= 0) NOT VALID;
