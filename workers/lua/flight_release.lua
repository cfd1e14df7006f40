-- Let go of a flight this run leads (and only then): its followers look for the answer, or lead.
--
-- KEYS[1] the flight key    ARGV[1] ours
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
