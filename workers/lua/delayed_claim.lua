-- Claim requests whose delay has passed, leasing them instead of removing them: if the claimer
-- dies before publishing, the lease runs out and another worker claims them again.
--
-- KEYS[1] delayed requests zset: member "priority|request id", score ready-at (ms)
-- ARGV[1] how many at most        ARGV[2] lease (ms)
-- Returns {lease_until, member, member, ...}: lease_until (a whole number of ms) is the score the
-- claimed members now carry; delayed_release.lua removes a member only if it still carries it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local lease_until = math.floor(now) + tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], lease_until, member)
end
table.insert(due, 1, tostring(lease_until))
return due
