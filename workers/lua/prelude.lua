-- Shared by every bucket and breaker script (prepended to each when it is loaded).
--
-- Algorithm: a token bucket per limit (requests, tokens, input tokens, output tokens), with
-- capacity = the per-minute limit and a continuous refill of limit/60000 per millisecond; never a
-- reset at a minute boundary. Chosen over GCRA because it is the model both providers document
-- for their own limiters, so a provider's "remaining" header maps straight onto our level, and
-- because one hash then holds every limit of a deployment plus its learned limits and pause.
-- Levels may go below zero (a call that used more than it reserved); refill pays that back.
--
-- Forecasts: a provider's headers say, per limit, the room now and when it comes back. When that
-- is what a token bucket would say (its time to full), nothing changes. When they say the room
-- comes back at a moment instead (a window's end, a rolling window's next expiry; the limit is
-- then learned as stepped for LEARNED_LIMIT_TTL_MS), bucket_settle.lua keeps the level within the
-- provider's room less what it may not have counted yet (and no lower than the lowest remaining
-- told of that moment less what is in flight), and stores that moment as 'ret:<limit>', what the
-- window lacked as 'gain:<limit>' and how fast the busy period took it as 'pace:<limit>': until
-- that moment the level holds (no refill); from it, the gain comes back at that pace (at once
-- without one; the next answer's remaining corrects either); then the level refills
-- continuously again until the next forecast, so that a provider that stops sending headers can
-- never hold a bucket shut. The floors a priority leaves for the ones above it are shares of
-- the window's room (window_room), lent out in the last `lift` ms before that moment: the room
-- comes back anyway.
--
-- Units: times in milliseconds (Redis server time), amounts in requests or tokens.
-- Floats are stored as strings with all 17 significant digits (num below): a number returned to
-- Redis would be truncated to an integer, and tostring() keeps only 14 digits.

local function num(x)
  return string.format('%.17g', x)
end

local function server_now_ms(override)
  -- override: only the property tests pass a clock; production uses Redis TIME so that the
  -- clocks of worker hosts never matter.
  if override and override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end

-- Redis TIME can step back: a failover to a replica whose clock is behind. Every script that
-- stores times in `hash` reads the clock through this, and stamps `ts` with what it returns, so
-- stored times never move backwards. A clock that steps back by d then stalls refill for d
-- (never drains a bucket, never hands out the same interval's refill twice) and no wait computed
-- from a stored time exceeds the duration it was stored for.
local function monotonic_now(hash, override)
  local now = server_now_ms(override)
  local last = tonumber(redis.call('HGET', hash, 'ts'))
  if last and last > now then return last end
  return now
end

-- Every elapsed time goes through this: never negative, whatever the clock did.
local function elapsed(now, since)
  if now > since then return now - since end
  return 0
end

local LEARNED_LIMIT_TTL_MS = 600000  -- a limit read from a provider header holds for 10 minutes

-- The effective capacity of one limit: the configured one, lowered by a limit the provider told
-- us (if recent), scaled by the rate factor that a 429 lowers.
local function capacity(bucket, name, configured, now, factor)
  local learned = tonumber(redis.call('HGET', bucket, 'cap:' .. name))
  local learned_at = tonumber(redis.call('HGET', bucket, 'capts:' .. name)) or 0
  local cap = configured
  if learned and elapsed(now, learned_at) < LEARNED_LIMIT_TTL_MS and learned < cap then cap = learned end
  return cap * factor, cap
end

-- Our calls reach the provider a little after we take their room, and not all equally late: the
-- first call of a burst, which tells a rolling window's moment (its oldest admission's expiry),
-- may arrive well before the rest (seen: alone, 80-250 ms ahead of the other 31 of a burst taken
-- at once, on new connections). Room that comes back at a pace (as it was taken) is therefore
-- counted back from this long after the moment, until the limit has shown that its room comes
-- back all at once ('whole:<limit>', bucket_settle.lua: a fixed window, whose moment is the
-- provider's own, and which our next call reaches after it anyway).
local PACED_LAG_MS = 250

-- A stepped forecast of one limit: its moment (0: none), what comes back then, how fast (per
-- ms; 0: all at once), and from how long after the moment.
local function forecast(bucket, name)
  local f = redis.call('HMGET', bucket, 'ret:' .. name, 'gain:' .. name, 'pace:' .. name, 'whole:' .. name)
  local pace, lag = tonumber(f[3]) or 0, 0
  if pace > 0 and not f[4] then lag = PACED_LAG_MS end
  return tonumber(f[1]) or 0, tonumber(f[2]) or 0, pace, lag
end

-- What a limit has got back `x` ms after its forecast's moment (nothing before it): the gain at
-- the pace from `lag` on (or at once), then continuous refill at `rate`.
local function back(x, gain, pace, rate, lag)
  x = x - lag
  if x < 0 then return 0 end
  if pace <= 0 then return gain + x * rate end
  if x * pace <= gain then return x * pace end
  return gain + (x - gain / pace) * rate
end

-- The level of one limit at `now`: what was stored at `since`, plus what came back since (the
-- continuous refill, or what a stepped forecast says), never above capacity.
local function level(bucket, name, cap, since, now)
  local stored = tonumber(redis.call('HGET', bucket, 'lvl:' .. name))
  if stored == nil then return cap end
  local rate, ret, gain, pace, lag = cap / 60000, forecast(bucket, name)
  local refilled = stored + elapsed(now, since) * rate
  if ret > 0 and now > since then
    refilled = stored + back(now - ret, gain, pace, rate, lag) - back(since - ret, gain, pace, rate, lag)
  end
  if refilled > cap then return cap end
  return refilled
end

-- Whether the limit's room was last seen coming back in steps (recently enough to trust).
local function stepped(bucket, name, now)
  local seen = tonumber(redis.call('HGET', bucket, 'step:' .. name))
  return seen ~= nil and elapsed(now, seen) < LEARNED_LIMIT_TTL_MS
end

-- The room one of the provider's windows holds, for a stepped limit (nil when unknown or not
-- stepped): the most an answer has shown, counting the answered call itself (the provider
-- counts a call when it admits it, so the first call of a window shows the whole window less
-- itself). A short window (10 s within a minute) holds a sixth of the per-minute limit: the
-- floors and what comes back at a moment are shares of it, not of the minute.
local function window_room(bucket, name, now)
  if not stepped(bucket, name, now) then return nil end
  return tonumber(redis.call('HGET', bucket, 'peak:' .. name))
end

-- Whether the floors are lent out: from `lift` ms before a forecast's moment until what it
-- said comes back is back (the room comes back anyway).
local function floor_lifted(bucket, name, now, lift)
  local ret, gain, pace, lag = forecast(bucket, name)
  local until_ms = ret
  if pace > 0 then until_ms = ret + lag + gain / pace end
  return ret > 0 and now >= ret - lift and now < until_ms
end

-- Milliseconds until `lvl` (the level now) reaches `need`: while a forecast holds the level and
-- the floor is what stands in the way, until the floor is lent out, or, while calls are in
-- flight (`busy`), a short while: their answers may show the level was low only for what they
-- reserved (seen: a window's last request told at its start to wait 8 s for the lend, in a
-- window then 81% used); else until what comes back (as `back` says) makes up the difference.
local FLOOR_RECHECK_MS = 500
local function wait_ms(bucket, name, cap, since, now, lvl, cost, need, lift, busy)
  local rate, ret, gain, pace, lag = cap / 60000, forecast(bucket, name)
  if ret <= 0 then return (need - lvl) * 60000 / cap end
  if now < ret - lift and lvl >= cost then
    if busy then return math.min(ret - lift - now, FLOOR_RECHECK_MS) end
    return ret - lift - now
  end
  -- The amount `back` must reach, counted from the forecast's moment; then its inverse.
  local y = need - lvl + back(now - ret, gain, pace, rate, lag)
  local x
  if y <= gain then
    x = pace > 0 and y / pace or 0
  else
    x = (pace > 0 and gain / pace or 0) + (y - gain) / rate
  end
  return math.max(ret + lag + x - now, 0)
end

-- A forecast is stepped when its reset differs from a token bucket's time to full by more than
-- this: the rounding of whole-second resets and thousand-rounded remainders fits within it.
local FORECAST_SLACK_MS = 2500
local SAME_MOMENT_MS = 3000  -- answers settled this much apart may tell one moment
local MIN_DRAIN_MS = 1000  -- a drain shorter than this tells no pace (its first calls leave at once)
local function differs(reset_ms, continuous_ms)
  return math.abs(reset_ms - continuous_ms) > FORECAST_SLACK_MS + 0.05 * continuous_ms
end

-- The rate factor now: lowered by a 429, recovering linearly to 1.
local function rate_factor(bucket, now, recover_per_ms)
  local factor = tonumber(redis.call('HGET', bucket, 'factor'))
  if factor == nil then return 1 end
  local since = tonumber(redis.call('HGET', bucket, 'factor_ts')) or now
  factor = factor + elapsed(now, since) * recover_per_ms
  if factor > 1 then return 1 end
  return factor
end

-- Parse "name=cost,name=cost" (a reservation's charges) into a table.
local function parse_charges(text)
  local charges = {}
  for name, cost in string.gmatch(text or '', '([%w_]+)=([%-%d%.e]+)') do
    charges[name] = tonumber(cost)
  end
  return charges
end

-- A reservation ends (settled, or expired with its worker): it leaves the hashes, and its charges
-- join each limit's running total of ended charges, 'ended:<limit>'. With 'sum:<limit>' (all
-- taken) that tells, at any take, what was in flight then (bucket_settle.lua: not_counted).
local function end_reservation(bucket, resv, resv_exp, id, record)
  redis.call('HDEL', resv, id)
  redis.call('ZREM', resv_exp, id)
  if not record then return end
  local charges = string.match(record, '^[^|]*|([^|]*)')
  for name, cost in pairs(parse_charges(charges)) do
    redis.call('HINCRBYFLOAT', bucket, 'ended:' .. name, cost)
  end
end
