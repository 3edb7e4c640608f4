-- Move a session to a new id in one step: the old id dies as the new one is born, with
-- the same data, a new version, and the user index entries moved (login, privilege
-- change). Both hashes must be in one hash slot (or the server standalone).
-- KEYS[1]  the old session's hash (see session_get.lua for its fields and user index)
-- KEYS[2]  the new session's hash; it must not exist
-- ARGV[1]  the sliding TTL in milliseconds
-- ARGV[2]  the prefix of the user index keys of the old session's hash tag
-- ARGV[3]  the old session's member in its user index (the secret part of its id)
-- ARGV[4]  the prefix of the user index keys of the new session's hash tag
-- ARGV[5]  the new session's member in its user index; KEYS[2] ends with it
-- ARGV[6]  '1': the new session belongs to ARGV[7] (a login: its absolute deadline
--          restarts); '0': it keeps the old session's user and deadline
-- ARGV[7]  the user (with ARGV[6] = '1')
-- ARGV[8]  the user's digest (with ARGV[6] = '1')
-- ARGV[9]  the absolute TTL in milliseconds, or 0 for none (with ARGV[6] = '1')
-- returns  the new hash as a flat list of fields and values; an empty list if the old
--          session does not exist or has reached its deadline (nothing created); 0 if
--          KEYS[2] exists already (nothing written)

local old, new = KEYS[1], KEYS[2]
local flat = redis.call('HGETALL', old)
if #flat == 0 then
    return flat
end
if redis.call('EXISTS', new) == 1 then
    return 0
end
local user, digest, deadline, version = nil, nil, nil, 0
for i = 1, #flat, 2 do
    local field = flat[i]
    if field == 'm:u' then
        user = flat[i + 1]
    elseif field == 'm:h' then
        digest = flat[i + 1]
    elseif field == 'm:x' then
        deadline = tonumber(flat[i + 1])
    elseif field == 'm:v' then
        version = tonumber(flat[i + 1])
    end
end
redis.call('DEL', old)
if digest then
    redis.call('SREM', ARGV[2] .. digest, ARGV[3])
end

local ttl = tonumber(ARGV[1])
local now_ms
if ARGV[6] == '1' then
    user, digest, deadline = ARGV[7], ARGV[8], nil
    if tonumber(ARGV[9]) > 0 then
        local now = redis.call('TIME')
        now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
        deadline = now_ms + tonumber(ARGV[9])
    end
end
if deadline then
    if not now_ms then
        local now = redis.call('TIME')
        now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    end
    local left = deadline - now_ms
    if left <= 0 then
        return {}
    end
    if left < ttl then
        ttl = left
    end
    redis.call('HSET', new, 'm:x', string.format('%.0f', deadline))
end
redis.call('HSET', new, 'm:v', version + 1)
for i = 1, #flat, 2 do
    if string.sub(flat[i], 1, 2) == 'd:' then
        redis.call('HSET', new, flat[i], flat[i + 1])
    end
end
redis.call('PEXPIRE', new, ttl)
if user then
    redis.call('HSET', new, 'm:u', user, 'm:h', digest)
    local index = ARGV[4] .. digest
    local prefix = string.sub(new, 1, #new - #ARGV[5])
    for _, member in ipairs(redis.call('SMEMBERS', index)) do
        if redis.call('EXISTS', prefix .. member) == 0 then
            redis.call('SREM', index, member)
        end
    end
    redis.call('SADD', index, ARGV[5])
    if redis.call('PTTL', index) < ttl then
        redis.call('PEXPIRE', index, ttl)
    end
end
return redis.call('HGETALL', new)
