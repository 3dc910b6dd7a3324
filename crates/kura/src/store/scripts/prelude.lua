-- Shared helpers, prepended to every entry script.

-- GET that treats a key of the wrong type (bad data left by someone else)
-- as absent and removes it, so a script never fails on foreign data.
local function read(k)
  local v = redis.pcall('GET', k)
  if type(v) == 'table' and v.err then
    redis.call('DEL', k)
    return false
  end
  return v
end

-- Is version `new` (decimal string) strictly newer than the envelope `cur`?
-- Compared as digit strings (no leading zeros), so versions past 2^53 keep
-- their order. A value without the "_v" header counts as older.
local function newer(new, cur)
  if not cur then return true end
  local cv = string.match(cur, '^{"_v":(%d+)')
  if not cv then return true end
  if #new ~= #cv then return #new > #cv end
  return new > cv
end
