-- KEYS: value
-- ARGV: the bytes that failed to decode
local v = redis.pcall('GET', KEYS[1])
if (type(v) == 'table' and v.err) or v == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
