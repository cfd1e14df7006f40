-- Read a semantic index's records whole, with the clock their expiries are written in.
--
-- KEYS: vec (semantic.lua)
-- Returns {now (ms, Redis time), the records string (false when the index is empty)}; the caller
-- skips records whose expiry is not after now (empty slots hold 0).
return {tostring(now_ms()), redis.call('GET', KEYS[1])}
