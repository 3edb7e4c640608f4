-- Write a value only if the writer's fencing token is not older than the newest seen.
-- KEYS[1]  the resource: a hash with fields "value" and "token"
-- ARGV[1]  the value
-- ARGV[2]  the writer's fencing token (a decimal integer)
-- returns  1 if written (ARGV[2] >= the stored token), 0 if rejected as stale

local seen = redis.call('HGET', KEYS[1], 'token')
if seen and tonumber(seen) > tonumber(ARGV[2]) then
    return 0
end
redis.call('HSET', KEYS[1], 'value', ARGV[1], 'token', ARGV[2])
return 1
