-- Remove entries from a semantic index (their answers are gone).
--
-- KEYS: vec, map, exp, free (semantic.lua)
-- ARGV: the entry keys
-- Returns the number of entries removed.
local record_size = tonumber(redis.call('HGET', KEYS[2], 'record') or '0')
local removed = 0
for i = 1, #ARGV do
  if redis.call('ZREM', KEYS[3], ARGV[i]) == 1 then removed = removed + 1 end
  release(ARGV[i], record_size)
end
return removed
