-- Delete a key only if it still holds the expected value (owner check).
-- KEYS[1]  the key
-- ARGV[1]  the expected value
-- returns  1 if the key held ARGV[1] and was deleted, 0 otherwise
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
