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

-- Is version `a` lower than version `b` (both decimal strings)? Compared
-- as digit strings (no leading zeros), so versions past 2^53 keep their
-- order.
local function below(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end

-- Is version `new` (decimal string) strictly newer than the envelope `cur`?
-- A value without the "_v" header counts as older.
local function newer(new, cur)
  if not cur then return true end
  local cv = string.match(cur, '^{"_v":(%d+)')
  if not cv then return true end
  return below(cv, new)
end

-- A lease holds its holder's token, followed by "\n" and a floor when a
-- committed change of that version arrived while the load was in flight
-- (invalidate_older.lua): the fill must then store that version or a newer
-- one. The token of a lease value:
local function lease_token(l)
  if not l then return nil end
  local i = string.find(l, '\n', 1, true)
  if i then return string.sub(l, 1, i - 1) end
  return l
end

-- The floor of a lease value, or nil.
local function lease_floor(l)
  if not l then return nil end
  return string.match(l, '\n(%d+)$')
end

-- Writes the stale copy kept past the value's TTL, or drops it when the
-- type keeps none (ms = 0).
local function keep_stale(k, bytes, ms)
  if tonumber(ms) > 0 then
    redis.call('SET', k, bytes, 'PX', ms)
  else
    redis.call('UNLINK', k)
  end
end

-- The version check of a write-behind accept. KEYS[1..5] are the entry's
-- keys. Compares the current version (pending copy, else value) with the
-- expected one. Returns nil on a match, {2, current_version} on a
-- mismatch, or {4} when neither is cached: there is nothing to compare
-- with, and a guess could acknowledge a patch of a version the database
-- has already replaced, so the caller reads the row again.
local function check_version(expected)
  local cur = read(KEYS[5]) or read(KEYS[1])
  if not cur then return {4} end
  local cv = string.match(cur, '^{"_v":(%d+)') or '0'
  if cv ~= expected then return {2, cv} end
  return nil
end

-- The entry half of an accepted write: voids leases and stores the value,
-- the stale copy and the pending copy (no TTL: it must outlive everything
-- until the database has it).
local function store_accepted(bytes, ttl_ms, stale_ms)
  redis.call('DEL', KEYS[2], KEYS[4])
  redis.call('SET', KEYS[1], bytes, 'PX', ttl_ms)
  keep_stale(KEYS[3], bytes, stale_ms)
  redis.call('SET', KEYS[5], bytes)
end

-- After the database committed `version` (or gave up on it): drops the
-- pending copy unless a newer write replaced it meanwhile; a dropped
-- write also stops being served. Returns 1 if the copy was dropped.
local function settle(version, mode)
  local p = read(KEYS[5])
  if p and string.match(p, '^{"_v":(%d+)') == version then
    redis.call('DEL', KEYS[5])
    if mode == 'dropped' then
      redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3])
    end
    return 1
  end
  return 0
end
