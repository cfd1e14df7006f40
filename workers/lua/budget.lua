-- Budgets (prepended after prelude.lua to the scripts that reserve or settle spend): what a
-- tenant, or one tag of its requests, may still spend in the current period, in USD.
--
-- Per budget and period two keys, under the tenant's hash tag {budget:<tenant>}:
--   hash  'spent' (settled cost, and reservations whose worker died, at what they reserved),
--         'held' (the sum of open reservations), 'r:<reservation id>' (what each one holds),
--         counters 'n:grant', 'n:wait', 'n:expired'
--   zset  reservation id -> when it expires (ms): a dead worker's reservation stops being held
-- A hash without 'spent' has lost its count (Redis restarted, or the key expired): the caller
-- rebuilds it from the ledger (workers/budgets.py) before anything is reserved against it.
--
-- Room: spent + held + this call's worst-case cost <= the limit. So calls in flight can never
-- add up past it: the period's spend exceeds the limit by at most what the calls in flight cost
-- beyond their worst case (a prompt estimate that came out low).

-- Reservations past their expiry: the call may have been paid for, at worst what it reserved
-- (what the ledger's lost-call estimate charges too), so that is what it counts.
local function budget_expire(hash, exp, now)
  local stale = redis.call('ZRANGEBYSCORE', exp, '-inf', now, 'LIMIT', 0, 100)
  for _, id in ipairs(stale) do
    local amount = tonumber(redis.call('HGET', hash, 'r:' .. id))
    if amount then
      redis.call('HINCRBYFLOAT', hash, 'spent', num(amount))
      redis.call('HINCRBYFLOAT', hash, 'held', num(-amount))
      redis.call('HDEL', hash, 'r:' .. id)
      redis.call('HINCRBY', hash, 'n:expired', 1)
    end
    redis.call('ZREM', exp, id)
  end
end

-- Whether every budget has room for its cost: nil when they all do, else the first that does
-- not, as {3, 1 if calls in flight hold some of it (room may come back when they settle) else 0,
-- name}, or {4, 0, name} when its count was lost and must be rebuilt first.
-- keys: the budgets' key pairs from KEYS[first]; args: from ARGV[at], b then b triples
-- (name, limit, cost).
local function budget_room(first, at, now)
  local b = tonumber(ARGV[at])
  for k = 1, b do
    local hash, exp = KEYS[first + 2 * k - 2], KEYS[first + 2 * k - 1]
    local name, limit, cost = ARGV[at + 3 * k - 2], tonumber(ARGV[at + 3 * k - 1]), tonumber(ARGV[at + 3 * k])
    local spent = tonumber(redis.call('HGET', hash, 'spent'))
    if spent == nil then return {4, 0, name} end
    budget_expire(hash, exp, now)
    spent = tonumber(redis.call('HGET', hash, 'spent'))
    local held = tonumber(redis.call('HGET', hash, 'held')) or 0
    -- A billionth of a dollar of slack: sums of floats must not refuse a call that fits exactly.
    if spent + held + cost > limit + 1e-9 then
      redis.call('HINCRBY', hash, 'n:wait', 1)
      return {3, held > 1e-12 and 1 or 0, name}
    end
  end
  return nil
end

-- Reserve each budget's cost under the reservation id, until it is settled or expires (ttl ms;
-- the keys live a period and a day past their last use, set by the caller as 'keep' ms).
local function budget_reserve(first, at, now, id, ttl, keep)
  local b = tonumber(ARGV[at])
  for k = 1, b do
    local hash, exp = KEYS[first + 2 * k - 2], KEYS[first + 2 * k - 1]
    local cost = tonumber(ARGV[at + 3 * k])
    redis.call('HINCRBYFLOAT', hash, 'held', num(cost))
    redis.call('HSET', hash, 'r:' .. id, num(cost))
    redis.call('HINCRBY', hash, 'n:grant', 1)
    redis.call('ZADD', exp, now + ttl, id)
    redis.call('PEXPIRE', hash, keep)
    redis.call('PEXPIRE', exp, keep)
  end
end
