-- Record how a call to this deployment went, and open or close the breaker.
--
-- KEYS[1] breaker hash {dep}     KEYS[2] calls zset {dep}     KEYS[3] failures zset {dep}
--   (sliding window: member = call id, score = time in ms on the breaker's monotonic clock,
--   prelude: monotonic_now, stamped as the hash's 'ts' on every call)
-- ARGV[1] clock override (ms) or ''   ARGV[2] call id   ARGV[3] 1 if the call failed, else 0
-- ARGV[4] window_ms   ARGV[5] fewest calls in the window before it may open
-- ARGV[6] failure ratio that opens it (0..1)   ARGV[7] probes that must succeed to close it
-- ARGV[8] 1 if this call was a half-open probe
-- ARGV[9] failures in a row that open it, whatever the window's ratio (0: never): a sudden
--         outage opens it at once, not only once its failures outweigh the window's successes
-- Returns the transition: 'opened', 'closed' or '' (none).
local breaker, calls, failures = KEYS[1], KEYS[2], KEYS[3]
local now = monotonic_now(breaker, ARGV[1])
redis.call('HSET', breaker, 'ts', num(now))
local id, failed = ARGV[2], ARGV[3] == '1'
local window, min_calls, ratio = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local needed, probe = tonumber(ARGV[7]), ARGV[8] == '1'
local in_a_row = tonumber(ARGV[9]) or 0
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
for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, math.max(window * 2, 3600000)) end
if state ~= 'closed' then return '' end
if in_a_row > 0 and streak >= in_a_row then
  redis.call('HSET', breaker, 'streak', 0)
  return open()
end
local total = redis.call('ZCARD', calls)
if total >= min_calls and redis.call('ZCARD', failures) / total >= ratio then return open() end
return ''
