-- KEYS: value, lease, stale, absent
-- ARGV: token, 'v' | 'n', bytes, version, ttl_ms, stale_ms[, 'r']
-- With 'r' (a refresh under a refresh lease) the same version replaces
-- the cached value, resetting its lifetime.
-- Returns 1 stored, 0 lease lost (or the load is older than the lease's
-- floor), 2 a same-or-newer value is cached
local lease = read(KEYS[2])
if lease_token(lease) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
-- A change committed while the load was in flight: a load that read an
-- older row (or none) is as void as if the lease had been taken from it.
local floor = lease_floor(lease)
if floor and (ARGV[2] == 'n' or below(ARGV[4], floor)) then return 0 end
if ARGV[2] == 'n' then
  if tonumber(ARGV[5]) > 0 then
    redis.call('SET', KEYS[4], '1', 'PX', ARGV[5])
  end
  return 1
end
if ARGV[7] == 'r' then
  local cur = read(KEYS[1])
  local cv = cur and string.match(cur, '^{"_v":(%d+)')
  if cv and below(ARGV[4], cv) then return 2 end
elseif not newer(ARGV[4], read(KEYS[1])) then
  return 2
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[5])
keep_stale(KEYS[3], ARGV[3], ARGV[6])
redis.call('DEL', KEYS[4])
return 1
