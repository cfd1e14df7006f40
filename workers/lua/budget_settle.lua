-- A call's reservation against its budgets ends (budget.lua): what it held is released, and what
-- it really cost is spent. A reservation already gone (settled, or expired and counted at what
-- it held) changes nothing: the books stay balanced.
--
-- KEYS: b pairs (budget hash, reservation expiry), all under {budget:<tenant>}
-- ARGV[1] reservation id   ARGV[2] the call's real cost (USD; 0 when no call was made)
-- Returns how many of the budgets still held the reservation.
local id, cost, found = ARGV[1], tonumber(ARGV[2]), 0
for k = 1, #KEYS / 2 do
  local hash, exp = KEYS[2 * k - 1], KEYS[2 * k]
  local amount = tonumber(redis.call('HGET', hash, 'r:' .. id))
  if amount then
    redis.call('HINCRBYFLOAT', hash, 'held', num(-amount))
    redis.call('HINCRBYFLOAT', hash, 'spent', num(cost))
    redis.call('HDEL', hash, 'r:' .. id)
    found = found + 1
  end
  redis.call('ZREM', exp, id)
end
return found
