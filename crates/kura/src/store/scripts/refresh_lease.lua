-- KEYS: value, lease, stale, absent, pending
-- ARGV: token, lease_ms
-- Returns 1 when the refresh lease is granted: the value is cached and no
-- lease is held (a load or another refresh is in flight otherwise).
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
