-- KEYS: value, lease, stale, absent
-- ARGV: token, 'v' | 'n', bytes, version, ttl_ms, stale_ms
-- Returns 1 stored, 0 lease lost, 2 a same-or-newer value is cached
if read(KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
if ARGV[2] == 'n' then
  if tonumber(ARGV[5]) > 0 then
    redis.call('SET', KEYS[4], '1', 'PX', ARGV[5])
  end
  return 1
end
if not newer(ARGV[4], read(KEYS[1])) then return 2 end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[5])
keep_stale(KEYS[3], ARGV[3], ARGV[6])
redis.call('DEL', KEYS[4])
return 1
