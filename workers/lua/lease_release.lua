-- Give a lease up: delete the key only if it still holds this run's token.
--
-- KEYS[1] the request's lease key        ARGV[1] this run's token
-- Returns 1 if it was deleted, 0 if it had expired or belonged to another run.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
