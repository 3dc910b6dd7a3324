-- After the database committed version ARGV[1] (or gave up on it): drop the
-- pending copy unless a newer write replaced it meanwhile. On Cluster,
-- where the queue lives in another slot; elsewhere settle_ack.lua does this
-- and the acknowledgement in one step.
-- KEYS: value, lease, stale, absent, pending
-- ARGV: version, 'applied' | 'dropped'
return settle(ARGV[1], ARGV[2])
