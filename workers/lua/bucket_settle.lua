-- After a call: give back what was reserved but not used (or take what was under-estimated),
-- learn from the provider's rate-limit headers (their forecast: prelude), and on a 429 pause the
-- deployment for everyone.
--
-- KEYS: as bucket_take.lua (bucket, reservations, reservation expiry, tenant bucket)
-- ARGV[1] clock override (ms) or ''        ARGV[2] reservation id
-- ARGV[3] factor recovery per ms           ARGV[4] pause (ms, 0 for none)
-- ARGV[5] 1 if the provider answered 429   ARGV[6] factor multiplier on a 429 (e.g. 0.7)
-- ARGV[7] lowest factor                     ARGV[8] follow-down tolerance (fraction of capacity)
-- ARGV[9] age (ms): how long before this settlement the provider answered; its durations (the
--         pause, resets) count from then, and its remaining is as of then
-- ARGV[10] n, then n groups of 6: name, configured limit/min, actual used (-1: keep the charge),
--         provider's limit, remaining, and reset (ms after its answer) (-1 each: not said)
-- then m, then m triples for the tenant bucket: name, limit/min, actual used (-1: keep)
-- then the learned output's sample (workers/output_estimate.py): the index in KEYS of the route's
--         samples list (0: no sample), how many it keeps, its TTL (ms), and the call's real
--         output tokens per completion, pushed on its head
-- KEYS[5..7] (optional) the deployment's breaker hash, calls and failures {dep}: the call is
--         counted there in the same step (breaker.lua), with the last BREAKER_COUNT_ARGS ARGV
--
-- Settling a reservation twice, or one that expired, gives nothing back: the books stay balanced.
-- The rate factor drops once per burst of 429s (not for a call admitted before the last drop),
-- and is back to 1 as soon as an answer to a call admitted since shows at least the room the
-- bucket thinks it has on every limit it tells of; without headers it recovers linearly.
-- Returns {1 if the reservation was found else 0, the breaker's transition ('opened', 'closed', '')}.
-- Time: the deployment's own monotonic clock (prelude: monotonic_now), stamped as 'ts' here.
local bucket, resv, resv_exp, tenant = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = monotonic_now(bucket, ARGV[1])
local id, recover = ARGV[2], tonumber(ARGV[3])
local pause_ms, limited = tonumber(ARGV[4]), ARGV[5] == '1'
local drop, min_factor, tolerance = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
-- When the provider answered: the ledger is written before the settlement, and a busy one can
-- delay it by seconds. The shape is judged on the answer's own figures (remaining and reset as
-- of then); the moment it tells counts from then.
local answered = now - tonumber(ARGV[9])

local taken, tenant_taken, totals_then, ended_then = {}, {}, nil, {}
local taken_at = -1
local record = redis.call('HGET', resv, id)
if record then
  local at, charges, tenant_charges, totals, ended = string.match(record, '^([^|]*)|([^|]*)|([^|]*)|?([^|]*)|?(.*)$')
  taken, tenant_taken, taken_at = parse_charges(charges), parse_charges(tenant_charges), tonumber(at)
  totals_then, ended_then = parse_charges(totals), parse_charges(ended)
end
end_reservation(bucket, resv, resv_exp, id, record)

-- Per limit, what calls in flight now hold: all of them, and those taken after this call.
local in_flight = nil
local function held(name)
  if in_flight == nil then
    in_flight = {all = {}, after = {}}
    local all = redis.call('HGETALL', resv)
    for j = 2, #all, 2 do
      local at, charges = string.match(all[j], '^([^|]*)|([^|]*)|')
      for limit, cost in pairs(parse_charges(charges)) do
        in_flight.all[limit] = (in_flight.all[limit] or 0) + cost
        if tonumber(at) > taken_at then in_flight.after[limit] = (in_flight.after[limit] or 0) + cost end
      end
    end
  end
  return in_flight.all[name] or 0, in_flight.after[name] or 0
end

-- What the provider may not have counted when it answered, as (least, most): at most, everything
-- taken after this call (in flight, or settled since: an answer settled late) and every call in
-- flight when it was taken (their requests may have reached the provider after it, and may have
-- been answered since); at least, calls taken after it still in flight. Nil without the
-- reservation.
local function not_counted(name)
  if not (totals_then and totals_then[name]) then return nil end
  local _, after_in_flight = held(name)
  local total = tonumber(redis.call('HGET', bucket, 'sum:' .. name)) or totals_then[name]
  local after = math.max(0, total - totals_then[name])
  local in_flight_then = math.max(0, totals_then[name] - (taken[name] or 0) - (ended_then[name] or 0))
  return after_in_flight, after + in_flight_then
end

local factor = rate_factor(bucket, now, recover)
local since = tonumber(redis.call('HGET', bucket, 'ts')) or now
local last_drop = tonumber(redis.call('HGET', bucket, 'drop_ts')) or -1
-- Admitted since the rate last dropped (HGET answers false, not nil, for a missing field).
local fresh = record ~= false and taken_at >= last_drop
local room_shown, told = fresh and not limited, false
local i = 10
local n = tonumber(ARGV[i])
for k = 1, n do
  local base = i + 6 * (k - 1)
  local name, configured, actual = ARGV[base + 1], tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local said_limit, said_remaining, said_reset = tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5]), tonumber(ARGV[base + 6])
  local cap, per_minute = capacity(bucket, name, configured, now, factor)
  local lvl = level(bucket, name, cap, since, now)
  if record and actual >= 0 and taken[name] then lvl = lvl + taken[name] - actual end
  if said_limit > 0 then
    per_minute = said_limit
    if said_limit < configured then
      -- The provider's real limit is lower than the configuration says: use it from now on.
      redis.call('HSET', bucket, 'cap:' .. name, num(said_limit), 'capts:' .. name, num(now))
      cap = said_limit * factor
    else
      redis.call('HDEL', bucket, 'cap:' .. name, 'capts:' .. name)
    end
  end
  if lvl > cap then lvl = cap end
  if said_remaining >= 0 then
    told = true
    if lvl > said_remaining + tolerance * cap then room_shown = false end
    -- Room that comes back later than a token bucket's would (or sooner): it comes in steps.
    local continuous = math.max(0, per_minute - said_remaining) * 60000 / per_minute
    local step = said_reset >= 0 and differs(said_reset, continuous)
    -- A 429 whose retry-after is far beyond what continuous refill would need for this call.
    local short = (taken[name] or 0) - said_remaining
    if limited and short > 0 then
      local refill = short * 60000 / per_minute
      step = step or (pause_ms > refill and differs(pause_ms, refill))
    end
    local was_stepped = stepped(bucket, name, now)
    if step then redis.call('HSET', bucket, 'step:' .. name, num(now)) end
    if stepped(bucket, name, now) then
      -- The window's room (prelude: window_room), learned afresh when the steps begin; a 429's
      -- remaining does not count the call it refused.
      if not limited then
        local shown = said_remaining + (taken[name] or 0)
        local peak = tonumber(redis.call('HGET', bucket, 'peak:' .. name))
        if not was_stepped or peak == nil or shown > peak then
          redis.call('HSET', bucket, 'peak:' .. name, num(shown))
        end
      end
      -- Within the provider's room less what it may not have counted: down to it with the
      -- least, up to it with the most (so that an answer settled late cannot raise the level by
      -- calls settled before it). Without the reservation, only down (then up, below, to what
      -- the lowest remaining of the window surely leaves).
      local least, most = not_counted(name)
      if least == nil then least, most = 0, math.huge end
      if lvl > said_remaining - least then lvl = said_remaining - least end
      if lvl < said_remaining - most then lvl = math.min(cap, said_remaining - most) end
      if said_reset >= 0 then
        -- How the room comes back at a moment: an answer to a call taken just after the pending
        -- moment of a mostly spent window shows at least half of the window's room back on a
        -- fixed window (all of it came back at once), less on a rolling one (only what has
        -- expired since). The former needs no lag (prelude: PACED_LAG_MS).
        local pending_at, pending_gain = forecast(bucket, name)
        local room_then = math.min(window_room(bucket, name, now) or per_minute, per_minute)
        if not limited and record and pending_at > 0 and taken_at >= pending_at
            and taken_at < pending_at + 4 * PACED_LAG_MS and pending_gain >= 0.5 * room_then then
          if said_remaining + (taken[name] or 0) >= 0.5 * room_then then
            redis.call('HSET', bucket, 'whole:' .. name, '1')
          else
            redis.call('HDEL', bucket, 'whole:' .. name)
          end
        end
        -- An answer settled later than another tells the same moment later by its delay: while
        -- one is pending, a moment up to SAME_MOMENT_MS after it is that one.
        local moment, pending = math.max(now, answered + said_reset), forecast(bucket, name)
        if pending > now and moment > pending and moment <= pending + SAME_MOMENT_MS then moment = pending end
        local new_moment = math.abs(moment - pending) > SAME_MOMENT_MS
        -- An answer to a call taken before the pending moment was first told tells a moment
        -- later than the one it saw by however long it took to settle (a slow thread, a slow
        -- call): it tells no new window, only its remaining.
        local told_at = tonumber(redis.call('HGET', bucket, 'told:' .. name)) or 0
        local stale = pending > 0 and new_moment and not (record and taken_at >= told_at)
        -- Until that moment the provider's room only shrinks (a window's, or what a rolling one
        -- has not yet given back): it is at most the lowest remaining any answer telling this
        -- moment showed, and at least that less every call in flight now and every call that
        -- ended without telling (only those may be missing from it). When nothing is in
        -- flight and every answer told, that is exactly the room.
        local low = redis.call('HMGET', bucket, 'low:' .. name, 'untold:' .. name)
        local lowest, untold = tonumber(low[1]), tonumber(low[2]) or 0
        if lowest == nil or (new_moment and not stale) then
          lowest, untold = said_remaining, 0
        elseif said_remaining < lowest then
          lowest = said_remaining
        end
        redis.call('HSET', bucket, 'low:' .. name, num(lowest), 'untold:' .. name, num(untold))
        local surely = lowest - untold - held(name)
        if lvl < surely then lvl = math.min(cap, surely) end
        if not stale then
          -- What the provider lacks comes back then, as fast as this busy period took it (a
          -- rolling window gives room back as it was taken; a fixed one, all at once, and the
          -- next answer says so).
          local room = window_room(bucket, name, now) or per_minute
          local gain = math.max(0, math.min(room, per_minute) - said_remaining)
          local pace = tonumber(redis.call('HGET', bucket, 'drain_pace:' .. name)) or 0
          redis.call('HSET', bucket, 'ret:' .. name, num(moment), 'gain:' .. name, num(gain), 'pace:' .. name, num(pace))
          if new_moment then redis.call('HSET', bucket, 'told:' .. name, num(now)) end
        end
      else
        redis.call('HDEL', bucket, 'ret:' .. name, 'gain:' .. name, 'pace:' .. name, 'whole:' .. name)
      end
    else
      redis.call('HDEL', bucket, 'ret:' .. name, 'gain:' .. name, 'pace:' .. name, 'whole:' .. name)
      -- The provider's room now is at most what it said when it answered plus its refill since:
      -- a level above that is ahead of the provider (its bucket began refilling later than ours,
      -- when the first call reached it).
      local bound = said_remaining + elapsed(now, answered) * per_minute / 60000
      if lvl > bound then lvl = bound end
      -- Someone else shares the key, or the provider counts differently: follow it down.
      if lvl > said_remaining + tolerance * cap then
        lvl = said_remaining
        redis.call('HINCRBY', bucket, 'n:follow', 1)
      end
    end
  end
  if said_remaining < 0 and record and taken[name] then
    -- An answer that tells nothing of this limit (an error without headers) may have been
    -- counted, after any answer yet to come: the lowest remaining's bound leaves it out.
    redis.call('HINCRBYFLOAT', bucket, 'untold:' .. name, taken[name])
  end
  redis.call('HSET', bucket, 'lvl:' .. name, num(lvl))
end
redis.call('HSET', bucket, 'ts', num(now))

i = i + 6 * n + 1
local m = tonumber(ARGV[i])
local tenant_since = tonumber(redis.call('HGET', tenant, 'ts')) or now
for k = 1, m do
  local name, limit, actual = ARGV[i + 3 * k - 2], tonumber(ARGV[i + 3 * k - 1]), tonumber(ARGV[i + 3 * k])
  local lvl = level(tenant, name, limit, tenant_since, now)
  if record and actual >= 0 and tenant_taken[name] then lvl = lvl + tenant_taken[name] - actual end
  if lvl > limit then lvl = limit end
  redis.call('HSET', tenant, 'lvl:' .. name, num(lvl), 'ts', num(now))
end

if limited then
  -- A 429 slipped through: everyone waits the provider's retry-after, and the rate drops once
  -- for the burst it came from, recovering linearly from here unless the headers show room.
  redis.call('HINCRBY', bucket, 'n:429', 1)
  -- A call admitted before the last drop is of the burst that drop already paid for.
  if fresh or not record then
    factor = math.max(min_factor, factor * drop)
    redis.call('HSET', bucket, 'drop_ts', num(now))
  end
  local paused = tonumber(redis.call('HGET', bucket, 'pause')) or 0
  local until_ms = answered + pause_ms
  if until_ms > paused then redis.call('HSET', bucket, 'pause', num(until_ms)) end
elseif room_shown and told and factor < 1 then
  factor = 1
end
redis.call('HSET', bucket, 'factor', num(factor), 'factor_ts', num(now))
-- A settlement long after the last grant must not leave a key without expiry behind (the state
-- Redis may run noeviction): what it wrote lives an hour, like everything bucket_take writes.
for _, key in ipairs(m > 0 and {bucket, tenant} or {bucket}) do
  if redis.call('PTTL', key) < 3600000 then redis.call('PEXPIRE', key, 3600000) end
end
-- The call's real output, a sample of its route's: never at the cost of the settlement (pcall).
i = i + 3 * m + 1
local samples_at = tonumber(ARGV[i])
if samples_at > 0 then
  local samples = KEYS[samples_at]
  redis.pcall('LPUSH', samples, ARGV[i + 3])
  redis.pcall('LTRIM', samples, 0, tonumber(ARGV[i + 1]) - 1)
  redis.pcall('PEXPIRE', samples, ARGV[i + 2])
end
local transition = ''
if KEYS[5] and samples_at ~= 5 then
  transition = breaker_count_from(KEYS[5], KEYS[6], KEYS[7], monotonic_now(KEYS[5], ARGV[1]),
    #ARGV - BREAKER_COUNT_ARGS + 1)
end
return {record and 1 or 0, transition}
