-- Record how a call to this deployment went, and open or close the breaker (breaker.lua).
--
-- KEYS[1] breaker hash {dep}     KEYS[2] calls zset {dep}     KEYS[3] failures zset {dep}
-- ARGV[1] clock override (ms) or ''   ARGV[2..9] as breaker.lua's breaker_count_from reads them
-- Returns the transition: 'opened', 'closed' or '' (none).
return breaker_count_from(KEYS[1], KEYS[2], KEYS[3], monotonic_now(KEYS[1], ARGV[1]), 2)
