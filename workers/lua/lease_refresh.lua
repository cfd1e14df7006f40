-- Keep a run's lease alive: extend it if it is still ours, write it again if Redis lost it (a
-- restart without its append-only file), leave it alone if another run has taken it.
--
-- KEYS[1] the request's lease key        ARGV[1] this run's token        ARGV[2] TTL (ms)
-- Returns 1 if the lease is ours (now extended), 0 if another run holds it.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
