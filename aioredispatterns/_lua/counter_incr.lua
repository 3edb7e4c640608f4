-- Add to a counter and refresh its TTL in one step, so it never lives without one.
-- KEYS[1]  the counter: a string (INCRBY, INCRBYFLOAT) or a hash (HINCRBY)
-- ARGV[1]  the command: INCRBY, INCRBYFLOAT or HINCRBY
-- ARGV[2]  the TTL in milliseconds, set (PEXPIRE) on every call
-- ARGV[3]  INCRBY / INCRBYFLOAT: the amount; HINCRBY: the field
-- ARGV[4]  HINCRBY: the amount
-- returns  the new value as a bulk string (read back with GET / HGET, so a count above
--          2**53 is not rounded by Lua's doubles on its way out)
--
-- The amount is passed through as the client's string, never as a Lua number. An error
-- (a value that is not a number, an overflow) is raised before anything is written.

local command = ARGV[1]
local value
if command == 'INCRBY' then
    redis.call('INCRBY', KEYS[1], ARGV[3])
    value = redis.call('GET', KEYS[1])
elseif command == 'INCRBYFLOAT' then
    value = redis.call('INCRBYFLOAT', KEYS[1], ARGV[3])
elseif command == 'HINCRBY' then
    redis.call('HINCRBY', KEYS[1], ARGV[3], ARGV[4])
    value = redis.call('HGET', KEYS[1], ARGV[3])
else
    return redis.error_reply('ERR counter_incr: unknown command ' .. tostring(command))
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return value
