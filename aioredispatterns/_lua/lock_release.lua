-- Release a lock if the caller owns it, and wake one waiter, in one atomic step.
-- KEYS[1]  the lock's owner key
-- KEYS[2]  the lock's wake-up list (same hash slot)
-- KEYS[3]  the "someone is waiting" marker set by failed acquires (same hash slot)
-- ARGV[1]  the owner id
-- ARGV[2]  how long an unconsumed wake-up may linger, in milliseconds
-- returns  1 if the key held ARGV[1] and was deleted (and a waiter woken), 0 otherwise

if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[3]) == 0 then
    return 1  -- nobody has waited lately: no wake-up to push
end
-- One wake-up at most: the waiter blocked longest (BLPOP serves in arrival order) gets
-- it; an unconsumed one is picked up by the next waiter instead of being lost.
redis.call('RPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], -1, -1)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
