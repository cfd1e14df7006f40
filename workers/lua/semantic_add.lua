-- Add (or refresh) one entry of a semantic index, drop the expired ones, keep within the bound.
--
-- KEYS: vec, map, exp, free (semantic.lua)
-- ARGV[1] the entry key (the answer it points to)   ARGV[2] the vector's bytes, encoded
-- ARGV[3] TTL (ms)                                  ARGV[4] the most entries the index keeps
-- Returns the entry's slot.
--
-- At the bound, the entries closest to expiry go first: with one TTL per route, the oldest.
-- All four keys expire with the index's last entry, so an index nobody writes to vanishes. A
-- cache Redis may evict one of them alone under memory pressure: the index is then cleared, as
-- it is when its vectors change size.
local record_size = 8 + #ARGV[2]
local max_entries = tonumber(ARGV[4])
local now = now_ms()
local expiry = now + tonumber(ARGV[3])

local present = redis.call('EXISTS', KEYS[1], KEYS[2], KEYS[3])
local stored_size = tonumber(redis.call('HGET', KEYS[2], 'record') or record_size)
if (present ~= 0 and present ~= 3) or stored_size ~= record_size then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
end
redis.call('HSET', KEYS[2], 'record', record_size)

for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  release(member, record_size)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)

local slot = redis.call('HGET', KEYS[2], 'k:' .. ARGV[1])
if not slot then
  while redis.call('ZCARD', KEYS[3]) >= max_entries do
    release(redis.call('ZPOPMIN', KEYS[3])[1], record_size)
  end
  slot = redis.call('SPOP', KEYS[4])
  if not slot then
    local used = tonumber(redis.call('HGET', KEYS[2], 'next') or '0')
    if used >= max_entries then
      -- Slots beyond the bound's count, none free: the free set was evicted. Start afresh.
      redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
      used = 0
    end
    slot = tostring(used)
    redis.call('HSET', KEYS[2], 'next', used + 1)
  end
  redis.call('HSET', KEYS[2], 'k:' .. ARGV[1], slot, 's:' .. slot, ARGV[1])
end

redis.call('SETRANGE', KEYS[1], tonumber(slot) * record_size, struct.pack('<d', expiry) .. ARGV[2])
redis.call('ZADD', KEYS[3], expiry, ARGV[1])

local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
for i = 1, 4 do redis.call('PEXPIREAT', KEYS[i], last[2]) end
return tonumber(slot)
