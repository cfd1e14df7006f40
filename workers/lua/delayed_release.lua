-- After publishing claimed requests: remove each from the delay queue, unless it was parked again
-- meanwhile (a worker ran the published message and parked it anew: a new score). Removing
-- that new parking would leave the request queued with no message anywhere.
--
-- KEYS[1] delayed requests zset     ARGV[1] the claim's lease_until (ms)     ARGV[2..] members
-- Returns how many were removed.
local removed = 0
for i = 2, #ARGV do
  if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i])) == tonumber(ARGV[1]) then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return removed
