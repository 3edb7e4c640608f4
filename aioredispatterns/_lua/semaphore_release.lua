-- Give a semaphore slot back and wake one waiter.
-- KEYS[1]  the holders: a sorted set, owner id -> expiry (server ms)
-- KEYS[2]  the wake-up list (same hash slot)
-- ARGV[1]  the owner id
-- ARGV[2]  how long an unconsumed wake-up may linger, in milliseconds
-- ARGV[3]  the number of slots (at most that many wake-ups are kept)
-- returns  1 if the holder still held its slot (now freed), 0 otherwise

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry then
    return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[2], '1')
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if tonumber(expiry) <= now_ms then
    return 0
end
return 1
