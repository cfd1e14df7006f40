-- Shared by the semantic index's scripts (prepended to each when it is loaded).
--
-- One index is four keys under one hash tag:
--   KEYS[1] vec   string: one record per slot at offset slot * record size; a record is the
--                 entry's expiry (ms, Redis time; 8-byte little-endian double, 0 = empty slot)
--                 followed by its vector as the caller encoded it (workers/semantic_index.py)
--   KEYS[2] map   hash: 'k:<entry key>' -> slot, 's:<slot>' -> entry key, 'next' -> slots ever
--                 used, 'record' -> the record size (bytes)
--   KEYS[3] exp   sorted set: entry key -> expiry (ms, Redis time); orders pruning and eviction
--   KEYS[4] free  set: slots emptied and not yet reused
-- Slots are reused, so the string never grows beyond the index's bound.

local EMPTY = string.rep('\0', 8)

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Forget one entry (already out of the sorted set): mark its record empty, free its slot.
local function release(member, record_size)
  local slot = redis.call('HGET', KEYS[2], 'k:' .. member)
  if slot then
    redis.call('SETRANGE', KEYS[1], tonumber(slot) * record_size, EMPTY)
    redis.call('HDEL', KEYS[2], 'k:' .. member, 's:' .. slot)
    redis.call('SADD', KEYS[4], slot)
  end
end
