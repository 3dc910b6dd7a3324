-- KEYS: value, lease, stale, absent, pending
-- ARGV: the clear's epoch (decimal)
-- Removes a value loaded before a clear (its envelope's epoch below the
-- clear's), with its stale copy, unless a write-behind write is pending
-- for it (a clear does not cover those). Values filled since the clear,
-- leases and "not found" markers are left alone. Returns 1 if it removed
-- the value.
if redis.call('EXISTS', KEYS[5]) == 1 then return 0 end
local v = read(KEYS[1])
if not v then return 0 end
local e = string.match(v, '^{"_v":%d+,"cached_at":"[^"]*","_m":%[%d+,(%d+)') or '0'
if below(e, ARGV[1]) then
  redis.call('UNLINK', KEYS[1], KEYS[3])
  return 1
end
return 0
