-- Shared by every bucket and breaker script (prepended to each when it is loaded).
--
-- Algorithm: a token bucket per limit (requests, tokens, input tokens, output tokens), with
-- capacity = the per-minute limit and a continuous refill of limit/60000 per millisecond; never a
-- reset at a minute boundary. Chosen over GCRA because it is the model both providers document
-- for their own limiters, so a provider's "remaining" header maps straight onto our level, and
-- because one hash then holds every limit of a deployment plus its learned limits and pause.
-- Levels may go below zero (a call that used more than it reserved); refill pays that back.
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

-- The level of one limit at `now`: what was stored, plus the refill since, never above capacity.
local function level(bucket, name, cap, since, now)
  local stored = tonumber(redis.call('HGET', bucket, 'lvl:' .. name))
  if stored == nil then return cap end
  local refilled = stored + elapsed(now, since) * cap / 60000
  if refilled > cap then return cap end
  return refilled
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
