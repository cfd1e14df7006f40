-- May a call go to this deployment now? The breaker's state machine, shared by every worker:
--   closed --(failure ratio over the window)--> open --(after open_ms)--> half_open
--   half_open --(probes succeed)--> closed;  half_open --(as many probes fail)--> open
--
-- KEYS[1] breaker hash {dep}: state, opened_at, half_open_at, probes (in flight), probe_ok,
--         ts (the breaker's monotonic clock, prelude: monotonic_now)
-- ARGV[1] clock override (ms) or ''   ARGV[2] open_ms   ARGV[3] probes allowed at once in half_open
-- Returns {1, 0, state}        allowed (state 'half_open' means: this call is a probe)
--         {0, wait_ms, state}  not now
local breaker = KEYS[1]
local now = monotonic_now(breaker, ARGV[1])
local open_ms, probes = tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HGET', breaker, 'state') or 'closed'
if state == 'closed' then return {1, 0, 'closed'} end

if state == 'open' then
  local open_for = elapsed(now, tonumber(redis.call('HGET', breaker, 'opened_at')) or 0)
  if open_for < open_ms then return {0, math.ceil(open_ms - open_for), 'open'} end
  redis.call('HSET', breaker, 'state', 'half_open', 'half_open_at', num(now), 'probes', 0, 'probe_ok', 0,
    'probe_failed', 0, 'ts', num(now))
  state = 'half_open'
end

-- A probe whose worker died never reports: after another open period, let new probes go.
local since = tonumber(redis.call('HGET', breaker, 'half_open_at')) or now
if elapsed(now, since) > open_ms then
  redis.call('HSET', breaker, 'half_open_at', num(now), 'probes', 0, 'ts', num(now))
end
local in_flight = tonumber(redis.call('HGET', breaker, 'probes')) or 0
if in_flight < probes then
  redis.call('HINCRBY', breaker, 'probes', 1)
  return {1, 0, 'half_open'}
end
return {0, math.ceil(open_ms / 4), 'half_open'}
