-- KEYS: value, lease, stale, absent, pending
-- ARGV: token, lease_ms, value_ttl_ms
-- Returns {1, value} | {2} (absent) | {3, stale} (lease granted) | {4, stale} (busy)
local v = read(KEYS[1])
if v then return {1, v} end
-- A write-behind write not yet in the database is the current value: put
-- it back in place (the value may have expired or been invalidated).
local p = read(KEYS[5])
if p then
  redis.call('SET', KEYS[1], p, 'PX', ARGV[3])
  return {1, p}
end
if redis.call('EXISTS', KEYS[4]) == 1 then return {2} end
local stale = read(KEYS[3])
local holder = read(KEYS[2])
-- Re-entrant: a retried pipeline must not make the holder wait for itself.
if holder and lease_token(holder) ~= ARGV[1] then return {4, stale} end
if holder then
  -- Keep the floor a committed change may have set.
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
else
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
end
return {3, stale}
