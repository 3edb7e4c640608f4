-- Set and delete fields of a session, field by field, and slide its TTL, in one step:
-- two requests of one session writing different fields never undo each other.
-- KEYS[1]  the session's hash (see session_get.lua for its fields and its user index)
-- ARGV[1]  the sliding TTL in milliseconds
-- ARGV[2]  the prefix of the user index keys of this session's hash tag
-- ARGV[3]  the session's member in its user index (the secret part of its id)
-- ARGV[4]  '1': return the whole hash after the change; '0': only the version
-- ARGV[5]  n, how many fields to set
-- ARGV[6 .. 5 + 2n]  field, value pairs to set ('d:' .. name, serialized value)
-- ARGV[6 + 2n ..]    fields to delete
-- returns  0 if the session does not exist or has reached its absolute deadline (nothing
--          written); else its new version (an integer >= 1), or with ARGV[4] = '1'
--          {version, flat list of the hash's fields and values}

local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then
    return 0
end
local ttl = tonumber(ARGV[1])
local meta = redis.call('HMGET', key, 'm:h', 'm:x')
local digest, deadline = meta[1], tonumber(meta[2])
if deadline then
    local now = redis.call('TIME')
    local left = deadline - (tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
    if left <= 0 then
        redis.call('DEL', key)
        if digest then
            redis.call('SREM', ARGV[2] .. digest, ARGV[3])
        end
        return 0
    end
    if left < ttl then
        ttl = left
    end
end
local n = tonumber(ARGV[5])
for i = 6, 5 + 2 * n, 2 do
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
end
for i = 6 + 2 * n, #ARGV do
    redis.call('HDEL', key, ARGV[i])
end
local version = redis.call('HINCRBY', key, 'm:v', 1)
redis.call('PEXPIRE', key, ttl)
if digest then
    local index = ARGV[2] .. digest
    redis.call('SADD', index, ARGV[3])
    if redis.call('PTTL', index) < ttl then
        redis.call('PEXPIRE', index, ttl)
    end
end
if ARGV[4] == '1' then
    return {version, redis.call('HGETALL', key)}
end
return version
