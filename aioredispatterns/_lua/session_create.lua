-- Create a session under a fresh id, enter it in its user's index, set its TTL, in one
-- step (create, restore, and the second step of a rotation across hash slots).
-- KEYS[1]  the new session's hash; it must not exist. Its user index is ARGV[2] ..
--          ARGV[5], built by the client from the same base (same hash tag, one slot)
-- ARGV[1]  the sliding TTL in milliseconds
-- ARGV[2]  the prefix of the user index keys of this session's hash tag
-- ARGV[3]  the session's member in its user index (the secret part of its id); KEYS[1]
--          ends with it, and the other sessions of the index are KEYS[1]'s prefix .. member
-- ARGV[4]  the user, or '' for an anonymous session
-- ARGV[5]  the user's digest (the index key's suffix), or ''
-- ARGV[6]  the absolute TTL in milliseconds from now, or 0 for none
-- ARGV[7]  an absolute deadline in ms on the server's clock (a rotated session keeps its
--          own), or 0; it wins over ARGV[6]
-- ARGV[8]  the version to start from (0 for a new session)
-- ARGV[9 ..]  field, value pairs ('d:' .. name, serialized value)
-- returns  1 created; 0 the key exists already (nothing written); -1 the deadline of
--          ARGV[7] has passed (nothing written)

local key = KEYS[1]
if redis.call('EXISTS', key) == 1 then
    return 0
end
local ttl = tonumber(ARGV[1])
local deadline = tonumber(ARGV[7])
local absolute = tonumber(ARGV[6])
if deadline > 0 or absolute > 0 then
    local now = redis.call('TIME')
    local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    if deadline == 0 then
        deadline = now_ms + absolute
    end
    local left = deadline - now_ms
    if left <= 0 then
        return -1
    end
    if left < ttl then
        ttl = left
    end
    redis.call('HSET', key, 'm:x', string.format('%.0f', deadline))
end
redis.call('HSET', key, 'm:v', tonumber(ARGV[8]) + 1)
for i = 9, #ARGV, 2 do
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', key, ttl)
if ARGV[4] ~= '' then
    redis.call('HSET', key, 'm:u', ARGV[4], 'm:h', ARGV[5])
    local index = ARGV[2] .. ARGV[5]
    -- Drop the index's entries whose session expired on its own, then add this one.
    local prefix = string.sub(key, 1, #key - #ARGV[3])
    for _, member in ipairs(redis.call('SMEMBERS', index)) do
        if redis.call('EXISTS', prefix .. member) == 0 then
            redis.call('SREM', index, member)
        end
    end
    redis.call('SADD', index, ARGV[3])
    if redis.call('PTTL', index) < ttl then
        redis.call('PEXPIRE', index, ttl)
    end
end
return 1
