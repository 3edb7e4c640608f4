-- Extend a lease if the caller still owns it.
-- KEYS[1]  the lock's owner key
-- ARGV[1]  the owner id
-- ARGV[2]  the new TTL in milliseconds
-- returns  1 if the key held ARGV[1] and its TTL was reset, 0 otherwise

if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
