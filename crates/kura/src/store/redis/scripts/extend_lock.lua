-- KEYS: lock
-- ARGV: token, ttl_ms
if read(KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
