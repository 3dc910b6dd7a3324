-- The WAL feed names a deleted profile by its user_id: make the unique index
-- on user_id the table's replica identity, so a DELETE's old key carries it.
-- (The other fed tables are keyed by their cache id already.) Metadata only:
-- no rewrite, no change for readers or writers.
ALTER TABLE profiles REPLICA IDENTITY USING INDEX profiles_user_id_key;
