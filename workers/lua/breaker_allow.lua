-- May a call go to this deployment now? (breaker.lua: the state machine)
--
-- KEYS[1] breaker hash {dep}
-- ARGV[1] clock override (ms) or ''   ARGV[2] open_ms   ARGV[3] probes allowed at once in half_open
-- Returns {1, 0, state}        allowed (state 'half_open' means: this call is a probe)
--         {0, wait_ms, state}  not now
local breaker = KEYS[1]
local now = monotonic_now(breaker, ARGV[1])
local allowed, wait_ms, state = breaker_permit(breaker, now, tonumber(ARGV[2]), tonumber(ARGV[3]))
if not allowed then return {0, wait_ms, state} end
if state == 'half_open' then breaker_take_probe(breaker) end
return {1, 0, state}
