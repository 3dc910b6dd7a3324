-- A read that resets the value's TTL (the adaptive rule's GETEX) and moves
-- the stale copy's end by as much, so the stale copy still outlives the
-- value by the type's max_stale (stale TTL = TTL + max_stale when written).
-- KEYS: value, stale
-- ARGV: ttl_ms
-- Returns the value, or nil
local v = redis.call('GET', KEYS[1])
if not v then return v end
local left = redis.call('PTTL', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
local stale_left = redis.call('PTTL', KEYS[2])
if stale_left > 0 then
  local margin = stale_left - math.max(left, 0)
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[1]) + math.max(margin, 0))
end
return v
