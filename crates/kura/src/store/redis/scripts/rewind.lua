-- KEYS: position
-- ARGV: the position expected (decimal), the new one (decimal)
-- Sets the position back to the new one only if it still holds the one
-- expected (another relay may have moved it meanwhile). Returns 1 if set.
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'table' and cur.err then cur = false end
if cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
