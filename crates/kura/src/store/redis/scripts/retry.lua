-- Puts a write the database refused back at the end of the queue (so it
-- never holds back the entries behind it, nor the queue's age), with its
-- attempt count and the time before which it is not retried, and
-- acknowledges the entries it replaces, in one step.
-- KEYS: stream
-- ARGV: group, id, version, attempts, not_before_ms, entry_id...
-- Returns the new entry id.
local new = redis.call('XADD', KEYS[1], '*', 'id', ARGV[2], 'v', ARGV[3],
  'a', ARGV[4], 'at', ARGV[5])
if #ARGV > 5 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 6))
  redis.call('XDEL', KEYS[1], unpack(ARGV, 6))
end
return new
