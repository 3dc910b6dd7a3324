-- PostgreSQL's replica identity for the WAL feed; SQLite keeps the trigger
-- log, so nothing changes here (kept so both backends number alike).
SELECT 1;
