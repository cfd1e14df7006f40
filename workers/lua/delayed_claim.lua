-- Claim requests whose delay has passed, leasing them instead of removing them: if the claimer
-- dies before publishing, the lease runs out and another worker claims them again.
--
-- KEYS[1] delayed requests zset: member "priority|request id", score ready-at (ms)
-- ARGV[1] how many at most        ARGV[2] lease (ms)
-- ARGV[3] how early (ms) a request may be claimed: those due within it go with this round
-- Returns {lease_until, next_in_ms, member, member, ...}: lease_until (a whole number of ms) is the
-- score the claimed members now carry (delayed_release.lua removes a member only if it still
-- carries it); next_in_ms: how long until the next member left is due (-1: none is left).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local lease_until = math.floor(now) + tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now + tonumber(ARGV[3] or 0), 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], lease_until, member)
end
local next_in = -1
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if first[2] then next_in = math.max(0, math.floor(tonumber(first[2]) - now)) end
table.insert(due, 1, tostring(lease_until))
table.insert(due, 2, next_in)
return due
