-- KEYS: position
-- ARGV: new position (decimal, no leading zeros)
-- Returns the position now held (decimal string): the new one if it is
-- greater than the old one (or none was held), else the old one. The
-- position thus only ever moves forward, whatever order relays report in.
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'table' and cur.err then cur = false end
if cur and not string.match(cur, '^%d+$') then cur = false end
local new = ARGV[1]
if cur and (#cur > #new or (#cur == #new and cur >= new)) then
  return cur
end
redis.call('SET', KEYS[1], new)
return new
