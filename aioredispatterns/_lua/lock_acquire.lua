-- Take a lock if it is free and issue its fencing token, in one atomic step.
-- KEYS[1]  the lock's owner key
-- KEYS[2]  the lock's fencing counter (same hash slot)
-- KEYS[3]  optional: the "someone is waiting" marker (same hash slot)
-- ARGV[1]  the owner id of this acquisition (unique per acquisition)
-- ARGV[2]  the lease TTL in milliseconds
-- ARGV[3]  the counter's TTL in milliseconds, refreshed on every acquire ("0": none)
-- returns  {1, token} when taken; {0, pttl} when held by someone else, where pttl is
--          the holder's remaining TTL in ms (-1: the key has no TTL)

if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    -- Tell the release to push a wake-up; a waiter blocks at most the holder's PTTL
    -- before it tries again (and renews this marker), so it outlives every wait.
    local pttl = redis.call('PTTL', KEYS[1])
    if KEYS[3] then
        redis.call('SET', KEYS[3], '1', 'PX', math.max(tonumber(ARGV[2]), pttl))
    end
    return {0, pttl}
end
-- The token is the counter plus one, raised to the server's clock in microseconds.
-- INCR keeps tokens strictly increasing on this server even if its clock steps back;
-- the clock floor keeps them increasing when the counter is lost (expired, flushed,
-- or never replicated before a failover), as long as clocks agree better than the time
-- between two acquisitions. Below 2^53, so Lua's doubles hold it exactly.
local now = redis.call('TIME')
local floor = tonumber(now[1]) * 1000000 + tonumber(now[2])
local token = redis.call('INCR', KEYS[2])
if token < floor then
    token = floor
    redis.call('SET', KEYS[2], string.format('%d', floor))
end
if ARGV[3] ~= '0' then
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
end
return {1, token}
