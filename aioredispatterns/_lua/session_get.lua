-- Read a session and slide its TTL: the whole hash expires, never single fields.
-- KEYS[1]  the session's hash. Its user index is ARGV[2] .. <the hash's 'm:h' field>: the
--          client builds both from one base, so they share KEYS[1]'s hash tag (one slot)
-- ARGV[1]  the sliding TTL in milliseconds
-- ARGV[2]  the prefix of the user index keys of this session's hash tag
-- ARGV[3]  the session's member in its user index (the secret part of its id)
-- returns  the hash as a flat list of fields and values (after the slide); an empty list
--          if there is no such session, or it has reached its absolute deadline (then it
--          is deleted here, with its index entry)
--
-- Meta fields: 'm:v' version, 'm:u' user, 'm:h' user digest, 'm:x' absolute deadline
-- (ms on the server's clock). Data fields are 'd:' .. name. TIME is read only when the
-- session has a deadline.

local flat = redis.call('HGETALL', KEYS[1])
if #flat == 0 then
    return flat
end
local digest, deadline
for i = 1, #flat, 2 do
    if flat[i] == 'm:h' then
        digest = flat[i + 1]
    elseif flat[i] == 'm:x' then
        deadline = tonumber(flat[i + 1])
    end
end
local ttl = tonumber(ARGV[1])
if deadline then
    local now = redis.call('TIME')
    local left = deadline - (tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
    if left <= 0 then
        redis.call('DEL', KEYS[1])
        if digest then
            redis.call('SREM', ARGV[2] .. digest, ARGV[3])
        end
        return {}
    end
    if left < ttl then
        ttl = left
    end
end
redis.call('PEXPIRE', KEYS[1], ttl)
if digest then
    -- The index outlives every session it lists; SADD puts back an entry an index lost.
    local index = ARGV[2] .. digest
    redis.call('SADD', index, ARGV[3])
    if redis.call('PTTL', index) < ttl then
        redis.call('PEXPIRE', index, ttl)
    end
end
return flat
