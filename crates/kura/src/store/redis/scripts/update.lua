-- KEYS: value, lease, stale, absent
-- ARGV: bytes, version, ttl_ms, stale_ms
-- Returns 1 stored, 0 nothing cached, 2 a same-or-newer value is cached
-- Any load in flight read the row before this commit: void its lease.
redis.call('DEL', KEYS[2], KEYS[4])
local cur = read(KEYS[1])
if not cur then
  -- Only a present value is replaced: an absent one may have been dropped
  -- by a newer write, and the next read loads the committed row anyway.
  redis.call('UNLINK', KEYS[3])
  return 0
end
if not newer(ARGV[2], cur) then return 2 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
keep_stale(KEYS[3], ARGV[1], ARGV[4])
return 1
