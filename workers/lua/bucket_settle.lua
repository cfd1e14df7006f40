-- After a call: give back what was reserved but not used (or take what was under-estimated),
-- learn from the provider's rate-limit headers, and on a 429 pause the deployment for everyone.
--
-- KEYS: as bucket_take.lua (bucket, reservations, reservation expiry, tenant bucket)
-- ARGV[1] clock override (ms) or ''        ARGV[2] reservation id
-- ARGV[3] factor recovery per ms           ARGV[4] pause (ms, 0 for none)
-- ARGV[5] 1 if the provider answered 429   ARGV[6] factor multiplier on a 429 (e.g. 0.7)
-- ARGV[7] lowest factor                     ARGV[8] follow-down tolerance (fraction of capacity)
-- ARGV[9] n, then n groups of 5: name, configured limit/min, actual used (-1: keep the charge),
--         provider's limit (-1: not said), provider's remaining (-1: not said)
-- then m, then m triples for the tenant bucket: name, limit/min, actual used (-1: keep)
--
-- Settling a reservation twice, or one that expired, gives nothing back: the books stay balanced.
-- Returns 1 if the reservation was found, 0 if not.
-- Time: the deployment's own monotonic clock (prelude: monotonic_now), stamped as 'ts' here.
local bucket, resv, resv_exp, tenant = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now = monotonic_now(bucket, ARGV[1])
local id, recover = ARGV[2], tonumber(ARGV[3])
local pause_ms, limited = tonumber(ARGV[4]), ARGV[5] == '1'
local drop, min_factor, tolerance = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])

local taken, tenant_taken = {}, {}
local record = redis.call('HGET', resv, id)
if record then
  local _, charges, tenant_charges = string.match(record, '^([^|]*)|([^|]*)|(.*)$')
  taken, tenant_taken = parse_charges(charges), parse_charges(tenant_charges)
  redis.call('HDEL', resv, id)
  redis.call('ZREM', resv_exp, id)
end

local factor = rate_factor(bucket, now, recover)
local since = tonumber(redis.call('HGET', bucket, 'ts')) or now
local i = 9
local n = tonumber(ARGV[i])
for k = 1, n do
  local base = i + 5 * (k - 1)
  local name, configured = ARGV[base + 1], tonumber(ARGV[base + 2])
  local actual, said_limit, said_remaining = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4]), tonumber(ARGV[base + 5])
  local cap = capacity(bucket, name, configured, now, factor)
  local lvl = level(bucket, name, cap, since, now)
  if record and actual >= 0 and taken[name] then lvl = lvl + taken[name] - actual end
  if said_limit > 0 then
    if said_limit < configured then
      -- The provider's real limit is lower than the configuration says: use it from now on.
      redis.call('HSET', bucket, 'cap:' .. name, num(said_limit), 'capts:' .. name, num(now))
      cap = said_limit * factor
    else
      redis.call('HDEL', bucket, 'cap:' .. name, 'capts:' .. name)
    end
  end
  if lvl > cap then lvl = cap end
  -- Someone else shares the key, or the provider counts differently: follow it down.
  if said_remaining >= 0 and lvl > said_remaining + tolerance * cap then
    lvl = said_remaining
    redis.call('HINCRBY', bucket, 'n:follow', 1)
  end
  redis.call('HSET', bucket, 'lvl:' .. name, num(lvl))
end
redis.call('HSET', bucket, 'ts', num(now))

i = i + 5 * n + 1
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
  -- A 429 slipped through: everyone waits the provider's retry-after, and the rate drops,
  -- recovering linearly from here.
  redis.call('HINCRBY', bucket, 'n:429', 1)
  factor = math.max(min_factor, factor * drop)
  local paused = tonumber(redis.call('HGET', bucket, 'pause')) or 0
  if now + pause_ms > paused then redis.call('HSET', bucket, 'pause', num(now + pause_ms)) end
end
redis.call('HSET', bucket, 'factor', num(factor), 'factor_ts', num(now))
-- A settlement long after the last grant must not leave a key without expiry behind (the state
-- Redis may run noeviction): what it wrote lives an hour, like everything bucket_take writes.
for _, key in ipairs(m > 0 and {bucket, tenant} or {bucket}) do
  if redis.call('PTTL', key) < 3600000 then redis.call('PEXPIRE', key, 3600000) end
end
return record and 1 or 0
