-- Claim requests whose delay has passed, leasing them instead of removing them: if the claimer
-- dies before publishing, the lease runs out and another worker claims them again.
--
-- KEYS[1] delayed requests zset: member "priority|request id", score ready-at (ms)
-- ARGV[1] how many at most        ARGV[2] lease (ms)
-- Returns the claimed members.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), member)
end
return due
