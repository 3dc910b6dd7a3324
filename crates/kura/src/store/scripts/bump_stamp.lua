-- KEYS: the stamps hash
-- ARGV: field
-- Raises the epoch and sets the field to it; returns the new epoch.
local e = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], ARGV[1], e)
return e
