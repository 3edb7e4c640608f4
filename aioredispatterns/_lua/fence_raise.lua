-- Raise a fencing counter to at least a given token (Redlock: agree on one token).
-- KEYS[1]  the fencing counter
-- ARGV[1]  the token (a decimal integer)
-- ARGV[2]  the counter's TTL in milliseconds ("0": none)
-- returns  the counter's value afterwards

local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local wanted = tonumber(ARGV[1])
if current < wanted then
    redis.call('SET', KEYS[1], ARGV[1])
    current = wanted
end
if ARGV[2] ~= '0' then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return current
