-- Take every limit of a call at once, or nothing.
--
-- KEYS[1] deployment bucket hash    {dep}   levels, learned limits, pause, factor, counters
-- KEYS[2] reservations hash         {dep}   reservation id ->
--                                           "taken_at|name=cost,...|tenant charges|name=running total,...
--                                            |name=ended total,..." (prelude: end_reservation)
-- KEYS[3] reservation expiry zset   {dep}   reservation id -> expiry (ms)
-- KEYS[4] tenant bucket hash        {dep}   levels of the tenant's own ceiling (may be unused)
-- ARGV[1] clock override (ms) or ''        ARGV[2] reservation id
-- ARGV[3] floor: fraction of each capacity this priority must leave in the bucket (0..1)
-- ARGV[4] reservation ttl (ms): the call's own timeouts plus a margin, so it outlives the call
-- ARGV[5] factor recovery per ms
-- ARGV[6] floor lift (ms): how long before a forecast's moment the floor is lent out (prelude)
-- ARGV[7] first call (ms): how much later than its first take a new bucket starts refilling
-- ARGV[8] floor idle (ms): on a continuous limit a floor is lent out while no priority above
--         this one has asked for this long
-- ARGV[9] the floors of the priorities above this one, comma-separated, spelled as ARGV[3] is
-- ARGV[10] n = number of deployment limits, then n triples: name, configured limit/min, cost
-- then m = number of tenant limits, then m triples: name, limit/min, cost
-- then the budgets (budget.lua): the KEYS index of the first budget's key pair, how long their
--         keys live (ms), b = number of budgets, then b triples: name, limit (USD), cost (USD)
-- KEYS[5] (optional) the deployment's breaker hash {dep}, asked first in the same step
--         (breaker.lua); then the last two ARGV are its open_ms and probes allowed at once
-- KEYS[5 or 6 ...] (optional) each budget's hash and reservation expiry {budget:<tenant>}: on a
--         Redis Cluster (another slot) they are taken by budget_take.lua just before instead
--
-- Returns {1, 0, ''}                granted (the reservation is recorded under its id)
--         {1, 0, 'probe'}           granted, and the call is the half-open breaker's probe
--         {0, wait_ms, reason}      not now: nothing taken; try again in wait_ms
--         {-1, limit, name}         never: the cost exceeds the limit itself
--         {2, wait_ms, state}       the breaker is open (or its probes are all out): nothing taken
--         {3, in_flight, budget}    a budget has no room for its worst-case cost: nothing taken;
--                                   in_flight 1 when open reservations may give some back
--         {4, 0, budget}            a budget's count is lost: rebuild it, then ask again
-- Time: the deployment's own monotonic clock (prelude: monotonic_now), stamped as 'ts' on a grant.
local bucket, resv, resv_exp, tenant = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = monotonic_now(bucket, ARGV[1])
local id, floor, ttl, recover = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local lift, first_call = tonumber(ARGV[6]), tonumber(ARGV[7])

-- A deployment its breaker keeps shut takes nothing; a probe's place is taken only with the room
-- (a probe that waits for room must not hold it).
-- Where the budgets' keys begin tells whether KEYS[5] is the breaker's (they come after it).
local tenant_at = 10 + 3 * tonumber(ARGV[10]) + 1
local budget_at = tenant_at + 3 * tonumber(ARGV[tenant_at]) + 1
local budget_first, budget_keep = tonumber(ARGV[budget_at]), tonumber(ARGV[budget_at + 1])
local breaker, probe = budget_first > 5 and KEYS[5] or nil, false
if breaker then
  local allowed, wait_ms, state = breaker_permit(breaker, monotonic_now(breaker, ARGV[1]),
    tonumber(ARGV[#ARGV - 1]), tonumber(ARGV[#ARGV]))
  if not allowed then return {2, wait_ms, state} end
  probe = state == 'half_open'
end

-- Who asked when: a floor protects the priorities above it only while they are around.
redis.call('HSET', bucket, 'asked:' .. ARGV[3], num(now))
if redis.call('PTTL', bucket) < 0 then redis.call('PEXPIRE', bucket, math.max(3600000, ttl)) end
local wanted = false
for above in string.gmatch(ARGV[9], '[^,]+') do
  local at = tonumber(redis.call('HGET', bucket, 'asked:' .. above))
  if at and elapsed(now, at) < tonumber(ARGV[8]) then wanted = true end
end

-- Reservations whose worker never settled them (it died) stop counting as in flight.
local stale = redis.call('ZRANGEBYSCORE', resv_exp, '-inf', now, 'LIMIT', 0, 50)
for _, old in ipairs(stale) do
  end_reservation(bucket, resv, resv_exp, old, redis.call('HGET', resv, old))
end
local busy = redis.call('HLEN', resv) > 0  -- calls in flight, whose answers may give room back

local paused = tonumber(redis.call('HGET', bucket, 'pause')) or 0
if paused > now then
  redis.call('HINCRBY', bucket, 'n:wait', 1)
  return {0, math.ceil(paused - now), 'paused'}
end

local factor = rate_factor(bucket, now, recover)
local wait, reason = 0, ''
local plan = {}  -- {hash, name, new level}

local function check(hash, name, configured, cost, scaled)
  local cap, unscaled = configured, configured
  if scaled then cap, unscaled = capacity(hash, name, configured, now, factor) end
  if cost > unscaled then return {-1, math.floor(unscaled), name} end
  local since = tonumber(redis.call('HGET', hash, 'ts')) or now
  local lvl = level(hash, name, cap, since, now)
  local share, base = floor, cap
  if scaled and stepped(hash, name, now) then
    -- A window's room comes back only at its moment: a floor lent out while nobody above asks
    -- would make the next one who does wait for the next window. It is lent just before that.
    if floor_lifted(hash, name, now, lift) then share = 0 end
    local room = window_room(hash, name, now)
    if room and room < base then base = room end
  elseif not wanted then
    -- A continuous refill gives whoever asks next the room back within a few seconds.
    share = 0
  end
  -- A priority's floor never asks for more than the whole bucket.
  local need = math.min(cost + share * base, cap)
  if lvl < need then
    local w = wait_ms(hash, name, cap, since, now, lvl, cost, need, lift, busy)
    if w > wait then wait, reason = w, name end
  end
  local after = lvl - cost
  if scaled and redis.call('HEXISTS', hash, 'lvl:' .. name) == 0 then
    -- A new bucket: the provider's begins refilling when this first call reaches it, a little
    -- after ours would; without this our refill runs that much ahead of it for good (seen as
    -- a 429 when a burst first empties both).
    after = after - first_call * cap / 60000
  end
  table.insert(plan, {hash, name, after, scaled and lvl >= 0.9 * cap})
  return nil
end

-- Every limit of a hash is passed on every call (cost 0 when it does not apply), so that all of
-- them are refilled up to the one timestamp stored for the hash.
local i = 10
local n = tonumber(ARGV[i])
local charges, tenant_charges = {}, {}
for k = 1, n do
  local name, limit, cost = ARGV[i + 3 * k - 2], tonumber(ARGV[i + 3 * k - 1]), tonumber(ARGV[i + 3 * k])
  local never = check(bucket, name, limit, cost, true)
  if never then redis.call('HINCRBY', bucket, 'n:never', 1); return never end
  table.insert(charges, name .. '=' .. cost)
end
i = i + 3 * n + 1
local m = tonumber(ARGV[i])
for k = 1, m do
  local name, limit, cost = ARGV[i + 3 * k - 2], tonumber(ARGV[i + 3 * k - 1]), tonumber(ARGV[i + 3 * k])
  local never = check(tenant, name, limit, cost, false)
  if never then redis.call('HINCRBY', bucket, 'n:never', 1); return {-1, never[2], 'tenant:' .. name} end
  table.insert(tenant_charges, name .. '=' .. cost)
end

-- The tenant's budgets (budget.lua), in this same step: a call waits for money as it waits for
-- room, and never holds one without the other.
local wall = server_now_ms(ARGV[1])
local short = budget_room(budget_first, budget_at + 2, wall)
if short then return short end

if wait > 0 then
  redis.call('HINCRBY', bucket, 'n:wait', 1)
  return {0, math.ceil(wait), reason}
end

for _, step in ipairs(plan) do
  redis.call('HSET', step[1], 'lvl:' .. step[2], num(step[3]), 'ts', num(now))
  if step[4] then
    -- Taken from a (nearly) full bucket: a busy period begins. How fast it drains tells how fast
    -- a window gives its room back (bucket_settle.lua: the pace of a forecast).
    local total = tonumber(redis.call('HGET', bucket, 'sum:' .. step[2])) or 0
    redis.call('HSET', bucket, 'drain_at:' .. step[2], num(now), 'drain_sum:' .. step[2], num(total), 'drain_pace:' .. step[2], '0')
  end
end
redis.call('HSET', bucket, 'factor', num(factor), 'factor_ts', num(now))
redis.call('HINCRBY', bucket, 'n:grant', 1)
-- Each limit's running total of everything taken, as it stands after this take: a settlement
-- tells from it what was taken after this call (bucket_settle.lua).
local totals, ended = {}, {}
for name, cost in string.gmatch(table.concat(charges, ','), '([%w_]+)=([^,]+)') do
  local total = redis.call('HINCRBYFLOAT', bucket, 'sum:' .. name, cost)
  table.insert(totals, name .. '=' .. total)
  table.insert(ended, name .. '=' .. (redis.call('HGET', bucket, 'ended:' .. name) or '0'))
  -- The fastest this busy period has drained the limit (averaged over MIN_DRAIN_MS at least).
  local drain = redis.call('HMGET', bucket, 'drain_at:' .. name, 'drain_sum:' .. name, 'drain_pace:' .. name)
  local drain_at, drain_sum, pace = tonumber(drain[1]), tonumber(drain[2]), tonumber(drain[3]) or 0
  if drain_at then
    local recent = (tonumber(total) - drain_sum) / math.max(now - drain_at, MIN_DRAIN_MS)
    if recent > pace then redis.call('HSET', bucket, 'drain_pace:' .. name, num(recent)) end
  end
end
local record = table.concat({
  num(now), table.concat(charges, ','), table.concat(tenant_charges, ','), table.concat(totals, ','),
  table.concat(ended, ',')}, '|')
redis.call('HSET', resv, id, record)
redis.call('ZADD', resv_exp, now + ttl, id)
-- Idle deployments leave no keys behind: everything expires an hour after its last use, or once
-- the longest reservation has, so that no call's reservation vanishes while the call runs.
for k = 1, 4 do redis.call('PEXPIRE', KEYS[k], math.max(3600000, ttl)) end
budget_reserve(budget_first, budget_at + 2, wall, id, ttl, budget_keep)
if probe then breaker_take_probe(breaker) end
return {1, 0, probe and 'probe' or ''}
