-- Extend a semaphore holder's lease if it still holds its slot.
-- KEYS[1]  the holders: a sorted set, owner id -> expiry (server ms)
-- ARGV[1]  the owner id
-- ARGV[2]  the new TTL in milliseconds
-- returns  1 if the holder's expiry was moved, 0 if it no longer holds a slot

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) <= now_ms then
    redis.call('ZREM', KEYS[1], ARGV[1])
    return 0
end
redis.call('ZADD', KEYS[1], 'XX', now_ms + tonumber(ARGV[2]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
return 1
