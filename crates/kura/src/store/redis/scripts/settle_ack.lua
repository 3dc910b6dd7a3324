-- Settles one entity and acknowledges its queue entries in one step (one
-- server or Sentinel: the entry and the queue are on the same server), so
-- a pending copy can never be left without a queue entry, nor a queue
-- entry acknowledged while its pending copy stays.
-- KEYS: value, lease, stale, absent, pending, stream, dead
-- ARGV: version, 'applied' | 'dropped', group, n, entry_id * n,
--       then for 'dropped': value_key, id, error, value, dead_max (0: no bound)
-- Returns how many dead letters the bound trimmed.
local n = tonumber(ARGV[4])
local trimmed = 0
if ARGV[2] == 'dropped' then
  local at = 5 + n
  redis.call('XADD', KEYS[7], '*', 'key', ARGV[at], 'id', ARGV[at + 1],
    'v', ARGV[1], 'error', ARGV[at + 2], 'value', ARGV[at + 3])
  local max = tonumber(ARGV[at + 4])
  if max > 0 then
    trimmed = redis.call('XTRIM', KEYS[7], 'MAXLEN', max)
  end
end
settle(ARGV[1], ARGV[2])
if n > 0 then
  redis.call('XACK', KEYS[6], ARGV[3], unpack(ARGV, 5, 4 + n))
  redis.call('XDEL', KEYS[6], unpack(ARGV, 5, 4 + n))
end
return trimmed
