-- Write-behind accept: the new value and its queue entry in one step.
-- KEYS: value, lease, stale, absent, pending, stream
-- ARGV: expected_version, bytes, version, ttl_ms, stale_ms, id, max_depth, max_age_ms
-- Returns {1, entry_id} accepted | {2, current_version} version changed
--       | {3, depth, oldest_age_ms} queue full | {4} nothing cached to compare with
-- The version is checked before the queue's limits: a conflict is a fact
-- about the caller's data, whatever the queue holds.
local refused = check_version(ARGV[1])
if refused then return refused end
local depth = redis.call('XLEN', KEYS[6])
local max_depth = tonumber(ARGV[7])
if max_depth > 0 and depth >= max_depth then return {3, depth, 0} end
local max_age = tonumber(ARGV[8])
if max_age > 0 and depth > 0 then
  local first = redis.call('XRANGE', KEYS[6], '-', '+', 'COUNT', 1)
  if first[1] then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    local age = now - tonumber(string.match(first[1][1], '^(%d+)'))
    if age >= max_age then return {3, depth, age} end
  end
end
store_accepted(ARGV[2], ARGV[4], ARGV[5])
return {1, redis.call('XADD', KEYS[6], '*', 'id', ARGV[6], 'v', ARGV[3])}
