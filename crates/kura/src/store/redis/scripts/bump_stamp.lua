-- KEYS: the stamps hash
-- ARGV: field, the epoch the caller holds
-- Raises the epoch and sets the field to it; returns the new epoch.
--
-- The epoch is the server's clock in microseconds, or one past the
-- highest epoch known (the hash's, the caller's), whichever is higher: a
-- hash lost (restart without persistence, FLUSHALL, eviction) and made
-- again starts above every epoch a value can carry. `id` names this
-- incarnation of the hash (its first epoch): a process that sees it
-- change drops what it knew of the old one.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
local held = tonumber(ARGV[2]) or 0
local e = math.max(now, cur + 1, held + 1)
redis.call('HSET', KEYS[1], 'epoch', string.format('%.0f', e), ARGV[1], string.format('%.0f', e))
redis.call('HSETNX', KEYS[1], 'id', string.format('%.0f', e))
return e
