-- Read a deployment's bucket for people (GET /v1/deployments, `headrace status --deployments`).
-- Writes nothing. The levels come from the same prelude functions (capacity, level, rate_factor)
-- that bucket_take.lua decides admission with, so what is shown is what is enforced.
--
-- KEYS[1] deployment bucket hash    {dep}   (as bucket_take.lua)
-- KEYS[2] reservations hash         {dep}
-- KEYS[3] reservation expiry zset   {dep}
-- ARGV[1] clock override (ms) or ''        ARGV[2] factor recovery per ms
-- ARGV[3] n = number of limits, then n pairs: name, configured limit/min
--
-- Returns a flat list of strings (a number returned as such would be truncated to an integer):
--   rate factor, paused for (ms), calls in flight, clock behind (ms: how far Redis TIME is
--   behind the bucket's last stamp; refill stalls meanwhile), grants, waits, never, 429s,
--   follow-downs, then per limit: name, effective capacity, level, learned limit ('' if none),
--   held by calls in flight, shape ('steps' if its room was last seen coming back at moments,
--   else 'continuous'), ms until the room the last forecast held back comes back (0: none held)
local bucket, resv, resv_exp = KEYS[1], KEYS[2], KEYS[3]
local clock = server_now_ms(ARGV[1])
local now = monotonic_now(bucket, ARGV[1])
local recover = tonumber(ARGV[2])

-- Reservations not yet settled nor expired (bucket_take.lua drops those at or before now).
local live = redis.call('ZRANGEBYSCORE', resv_exp, '(' .. num(now), '+inf')
local held, calls = {}, 0
-- In slices: unpack() of thousands of ids would overflow Lua's stack.
for first = 1, #live, 500 do
  local ids = {}
  for i = first, math.min(first + 499, #live) do table.insert(ids, live[i]) end
  for _, record in ipairs(redis.call('HMGET', resv, unpack(ids))) do
    if record then
      calls = calls + 1
      local _, charges = string.match(record, '^([^|]*)|([^|]*)|')
      for name, cost in pairs(parse_charges(charges)) do held[name] = (held[name] or 0) + cost end
    end
  end
end

local factor = rate_factor(bucket, now, recover)
local since = tonumber(redis.call('HGET', bucket, 'ts')) or now
local paused = tonumber(redis.call('HGET', bucket, 'pause')) or 0
local counters = redis.call('HMGET', bucket, 'n:grant', 'n:wait', 'n:never', 'n:429', 'n:follow')
local out = {num(factor), num(math.max(0, paused - now)), tostring(calls), num(now - clock)}
for _, value in ipairs(counters) do table.insert(out, value or '0') end

local n = tonumber(ARGV[3])
for k = 1, n do
  local name, configured = ARGV[2 + 2 * k], tonumber(ARGV[3 + 2 * k])
  local cap, unscaled = capacity(bucket, name, configured, now, factor)
  local learned = ''
  if unscaled < configured then learned = num(unscaled) end
  table.insert(out, name)
  table.insert(out, num(cap))
  table.insert(out, num(level(bucket, name, cap, since, now)))
  table.insert(out, learned)
  table.insert(out, num(held[name] or 0))
  table.insert(out, stepped(bucket, name, now) and 'steps' or 'continuous')
  local ret = forecast(bucket, name)
  table.insert(out, num(ret > now and ret - now or 0))
end
return out
