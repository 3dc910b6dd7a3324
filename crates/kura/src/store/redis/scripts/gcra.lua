-- KEYS: the limit's key (its theoretical arrival time, in microseconds)
-- ARGV: emission interval (µs: period / limit), period (µs)
-- Returns {allowed (1|0), remaining, reset_us, retry_after_us}
-- GCRA: a request is admitted if, once its emission interval is added, the
-- arrival time is at most one period ahead of now; the clock is Redis's,
-- so every instance counts on the same one.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local step = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local tat = tonumber(read(KEYS[1]) or '') or now
if tat < now then tat = now end
local after = tat + step
if after - now > period then
  return {0, 0, tat - now, after - period - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', after), 'PX', math.ceil((after - now) / 1000) + 1)
return {1, math.floor((period - (after - now)) / step), after - now, 0}
