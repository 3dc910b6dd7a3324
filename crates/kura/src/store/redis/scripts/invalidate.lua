-- KEYS: value, lease, stale, absent
-- Returns 1 if a value was cached
local n = redis.call('UNLINK', KEYS[1])
redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4])
return n
