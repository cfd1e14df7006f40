-- Reserve a call's worst-case cost against its tenant's budgets, on their own (budget.lua). On
-- one Redis node bucket_take.lua does this in the same step as the rate-limit room; on a Redis
-- Cluster the budgets' keys live in another slot than the deployment's, so this runs just
-- before the take, and the reservation is given back if the take does not grant.
--
-- KEYS: b pairs (budget hash, reservation expiry), all under {budget:<tenant>}
-- ARGV[1] clock override (ms) or ''   ARGV[2] reservation id   ARGV[3] reservation ttl (ms)
-- ARGV[4] how long the keys live (ms)   ARGV[5] b, then b triples: name, limit (USD), cost (USD)
-- Returns {1, 0, ''} reserved, or budget_room's {3, in_flight, name} / {4, 0, name}.
local now = server_now_ms(ARGV[1])
local short = budget_room(1, 5, now)
if short then return short end
budget_reserve(1, 5, now, ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]))
return {1, 0, ''}
