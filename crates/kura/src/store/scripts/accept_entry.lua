-- Write-behind accept on Cluster, entry half: the queue entry is appended
-- by a separate command (the stream lives in another slot).
-- KEYS: value, lease, stale, absent, pending
-- ARGV: expected_version, bytes, ttl_ms, stale_ms
-- Returns {1} stored | {2, current_version}
return accept_entry(ARGV[1], ARGV[2], ARGV[3], ARGV[4]) or {1}
