-- After the database committed version ARGV[1] (or gave up on it): drop the
-- pending copy unless a newer write replaced it meanwhile.
-- KEYS: value, lease, stale, absent, pending
-- ARGV: version, 'applied' | 'dropped'
local p = read(KEYS[5])
if p and string.match(p, '^{"_v":(%d+)') == ARGV[1] then
  redis.call('DEL', KEYS[5])
  if ARGV[2] == 'dropped' then
    -- The write will never reach the database: stop serving it.
    redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3])
  end
  return 1
end
return 0
