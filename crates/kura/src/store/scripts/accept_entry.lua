-- Write-behind accept on Cluster, entry half: compare-and-set the value and
-- write the pending copy. The queue entry is appended by a separate command
-- (the stream lives in another slot).
-- KEYS: value, lease, stale, absent, pending
-- ARGV: expected_version, bytes, ttl_ms, stale_ms
-- Returns {1} stored | {2, current_version}
local cur = read(KEYS[5]) or read(KEYS[1])
if cur then
  local cv = string.match(cur, '^{"_v":(%d+)') or '0'
  if cv ~= ARGV[1] then return {2, cv} end
end
redis.call('DEL', KEYS[2], KEYS[4])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if tonumber(ARGV[4]) > 0 then
  redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[4])
else
  redis.call('UNLINK', KEYS[3])
end
redis.call('SET', KEYS[5], ARGV[2])
return {1}
