-- Write-behind accept on Cluster, entry half: the queue entry is appended
-- by a separate command (the stream lives in another slot), and the
-- queue's limits were read before.
-- KEYS: value, lease, stale, absent, pending
-- ARGV: expected_version, bytes, ttl_ms, stale_ms, full ('1': past a limit)
-- Returns {1} stored | {2, current_version} | {3} full | {4} nothing cached
local refused = check_version(ARGV[1])
if refused then return refused end
if ARGV[5] == '1' then return {3} end
store_accepted(ARGV[2], ARGV[3], ARGV[4])
return {1}
