-- Where one budget stands this period (budget.lua), for people and for the ladder: reservations
-- past their expiry are counted first, as the next take would count them, so that a dead
-- worker's reservation does not show as in flight until someone asks for room.
--
-- KEYS[1] the budget's hash, KEYS[2] its reservation expiry     ARGV[1] clock override (ms) or ''
-- Returns {spent, held}; spent is nil when the count is lost (or nothing was ever counted).
if redis.call('HEXISTS', KEYS[1], 'spent') == 0 then return {false, '0'} end
budget_expire(KEYS[1], KEYS[2], server_now_ms(ARGV[1]))
local counts = redis.call('HMGET', KEYS[1], 'spent', 'held')
return {counts[1], counts[2] or '0'}
