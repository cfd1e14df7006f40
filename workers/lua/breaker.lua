-- The circuit breaker's state machine, one per deployment, shared by every worker (prepended,
-- after the prelude, to the scripts that use it: breaker_allow.lua and breaker_record.lua on their
-- own, bucket_take.lua and bucket_settle.lua when admission asks the breaker in the same step):
--   closed --(failure ratio over the window, or failures in a row)--> open --(after open_ms)-->
--   half_open --(probes succeed)--> closed;  half_open --(as many probes fail)--> open
--
-- The breaker hash {dep}: state, opened_at, half_open_at, probes (in flight), probe_ok,
-- probe_failed, streak, n:opened, ts (its monotonic clock, prelude: monotonic_now). The window of
-- recent calls is two sorted sets {dep} (member = call id, score = time in ms): calls, failures.

-- May a call go to this deployment now? Returns allowed (bool), wait_ms, state; a 'half_open'
-- allowance makes the call a probe, counted by breaker_take_probe only once the call is sure to go
-- (a take that then waits for room must not hold a probe's place).
local function breaker_permit(breaker, now, open_ms, probes)
  local state = redis.call('HGET', breaker, 'state') or 'closed'
  if state == 'closed' then return true, 0, 'closed' end

  if state == 'open' then
    local open_for = elapsed(now, tonumber(redis.call('HGET', breaker, 'opened_at')) or 0)
    if open_for < open_ms then return false, math.ceil(open_ms - open_for), 'open' end
    redis.call('HSET', breaker, 'state', 'half_open', 'half_open_at', num(now), 'probes', 0, 'probe_ok', 0,
      'probe_failed', 0, 'ts', num(now))
  end

  -- A probe whose worker died never reports: after another open period, let new probes go.
  local since = tonumber(redis.call('HGET', breaker, 'half_open_at')) or now
  if elapsed(now, since) > open_ms then
    redis.call('HSET', breaker, 'half_open_at', num(now), 'probes', 0, 'ts', num(now))
  end
  if (tonumber(redis.call('HGET', breaker, 'probes')) or 0) < probes then return true, 0, 'half_open' end
  return false, math.ceil(open_ms / 4), 'half_open'
end

local function breaker_take_probe(breaker)
  redis.call('HINCRBY', breaker, 'probes', 1)
end

-- Count how one call went, and open or close the breaker. `probe`: the call was a half-open probe;
-- `in_a_row`: failures in a row that open it whatever the window's ratio (0: never), so that a
-- sudden outage opens it at once, not only once its failures outweigh the window's successes.
-- Returns the transition: 'opened', 'closed' or '' (none).
local function breaker_count(breaker, calls, failures, now, id, failed, window, min_calls, ratio, needed, probe, in_a_row)
  redis.call('HSET', breaker, 'ts', num(now))
  local state = redis.call('HGET', breaker, 'state') or 'closed'

  local function open()
    redis.call('HSET', breaker, 'state', 'open', 'opened_at', num(now))
    redis.call('HINCRBY', breaker, 'n:opened', 1)
    return 'opened'
  end

  if state == 'half_open' and probe then
    redis.call('HINCRBY', breaker, 'probes', -1)
    -- As many failed probes as must succeed reopen it: one random 5xx from a provider that is
    -- back (a few percent of its calls fail anyway) must not keep it shut for another open period.
    if failed then
      if redis.call('HINCRBY', breaker, 'probe_failed', 1) >= needed then return open() end
      return ''
    end
    if redis.call('HINCRBY', breaker, 'probe_ok', 1) >= needed then
      redis.call('HSET', breaker, 'state', 'closed')
      redis.call('DEL', calls, failures)
      return 'closed'
    end
    return ''
  end

  redis.call('ZADD', calls, now, id)
  local streak = 0
  if failed then
    redis.call('ZADD', failures, now, id)
    streak = redis.call('HINCRBY', breaker, 'streak', 1)
  else
    redis.call('HSET', breaker, 'streak', 0)
  end
  redis.call('ZREMRANGEBYSCORE', calls, '-inf', now - window)
  redis.call('ZREMRANGEBYSCORE', failures, '-inf', now - window)
  for _, key in ipairs({breaker, calls, failures}) do redis.call('PEXPIRE', key, math.max(window * 2, 3600000)) end
  if state ~= 'closed' then return '' end
  if in_a_row > 0 and streak >= in_a_row then
    redis.call('HSET', breaker, 'streak', 0)
    return open()
  end
  local total = redis.call('ZCARD', calls)
  if total >= min_calls and redis.call('ZCARD', failures) / total >= ratio then return open() end
  return ''
end

-- The arguments every caller passes for a count, from ARGV[at] on: call id, 1 if it failed,
-- window_ms, fewest calls in the window before it may open, failure ratio that opens it (0..1),
-- probes that must succeed to close it, 1 if the call was a probe, failures in a row that open it.
local BREAKER_COUNT_ARGS = 8
local function breaker_count_from(breaker, calls, failures, now, at)
  return breaker_count(breaker, calls, failures, now, ARGV[at], ARGV[at + 1] == '1', tonumber(ARGV[at + 2]),
    tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4]), tonumber(ARGV[at + 5]), ARGV[at + 6] == '1',
    tonumber(ARGV[at + 7]) or 0)
end
