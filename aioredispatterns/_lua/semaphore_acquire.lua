-- Take one of N slots of a semaphore if one is free, and issue a fencing token.
-- KEYS[1]  the holders: a sorted set, owner id -> expiry (server ms)
-- KEYS[2]  the fencing counter (same hash slot)
-- ARGV[1]  the owner id
-- ARGV[2]  the lease TTL in milliseconds
-- ARGV[3]  the number of slots
-- ARGV[4]  the counter's TTL in milliseconds ("0": none)
-- returns  {1, token} when taken; {0, wait} when full, where wait is the ms until the
--          first holder's lease runs out

local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local now_ms = math.floor(now_us / 1000)
local ttl = tonumber(ARGV[2])
-- Holders that stopped renewing (crashed, paused) lose their slot at their expiry.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
    local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    return {0, tonumber(first[2]) - now_ms}
end
redis.call('ZADD', KEYS[1], now_ms + ttl, ARGV[1])
-- The whole set expires when its longest lease does.
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], tonumber(last[2]))
local token = redis.call('INCR', KEYS[2])
if token < now_us then
    token = now_us
    redis.call('SET', KEYS[2], string.format('%d', now_us))
end
if ARGV[4] ~= '0' then
    redis.call('PEXPIRE', KEYS[2], ARGV[4])
end
return {1, token}
