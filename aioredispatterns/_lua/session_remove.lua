-- Delete a session and its entry in its user index, and return what it held, in one
-- step (destroy, and the first step of a rotation across hash slots: the old id dies
-- here, and no write to it can land after the read).
-- KEYS[1]  the session's hash (see session_get.lua for its fields and its user index)
-- ARGV[1]  the prefix of the user index keys of this session's hash tag
-- ARGV[2]  the session's member in its user index (the secret part of its id)
-- returns  the hash as a flat list of fields and values before the delete; an empty list
--          if there was no such session

local flat = redis.call('HGETALL', KEYS[1])
if #flat == 0 then
    return flat
end
redis.call('DEL', KEYS[1])
for i = 1, #flat, 2 do
    if flat[i] == 'm:h' then
        local index = ARGV[1] .. flat[i + 1]
        redis.call('SREM', index, ARGV[2])
        break
    end
end
return flat
