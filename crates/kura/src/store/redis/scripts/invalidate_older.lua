-- KEYS: value, lease, stale, absent
-- ARGV: version of the committed change ('' for a delete)
-- Returns 1 if a value was cached and dropped, 0 if nothing was cached,
-- 2 if a value of the same or a newer version is cached (kept).
-- A change already reflected by the cached value needs no invalidation: a
-- duplicate or late event cannot remove a newer value. A delete has no
-- version to compare with, so it always invalidates.
if ARGV[1] == '' then
  local n = redis.call('UNLINK', KEYS[1])
  redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4])
  return n
end
local cur = read(KEYS[1])
if cur and not newer(ARGV[1], cur) then
  return 2
end
local n = redis.call('UNLINK', KEYS[1])
redis.call('UNLINK', KEYS[3], KEYS[4])
-- A load in flight keeps its lease with the change's version as a floor:
-- if it read this version or a newer one its fill lands (the writer's own
-- invalidation usually started that load, and voiding it would cost a
-- second miss); if it read an older row, its fill is refused.
local lease = read(KEYS[2])
if lease then
  local floor = lease_floor(lease)
  if not floor or below(floor, ARGV[1]) then
    redis.call('SET', KEYS[2], lease_token(lease) .. '\n' .. ARGV[1], 'KEEPTTL')
  end
end
return n
