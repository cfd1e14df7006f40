-- Lead the call for an answer identical requests wait on: take the flight key if nobody holds
-- it, or if it still holds the leader a follower found dead (its value unchanged since it looked).
--
-- KEYS[1] the flight key    ARGV[1] the value seen ("" when none)    ARGV[2] ours    ARGV[3] TTL (ms)
-- Returns 1 if the flight is now ours, 0 if another follower took it first.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', tonumber(ARGV[3]))
return 1
