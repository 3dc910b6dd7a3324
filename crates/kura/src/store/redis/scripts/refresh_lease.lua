-- KEYS: value, lease, stale, absent, pending
-- ARGV: token, lease_ms, expiry the caller saw in the value's envelope
-- Returns 1 when the refresh lease is granted: the value the caller read
-- is still cached (another refresh has not replaced it) and no lease is
-- held (a load or another refresh is in flight otherwise).
local cur = read(KEYS[1])
if not cur then return 0 end
local e = string.match(cur, '^{"_v":%d+,"cached_at":"[^"]*","_m":%[(%d+)')
if e ~= ARGV[3] then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
