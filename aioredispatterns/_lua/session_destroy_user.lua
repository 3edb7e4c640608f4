-- Log a user out everywhere: delete every session in the user's index and the index, in
-- one step (a session created for the user after it starts is not affected; one created
-- before it ends is deleted).
-- KEYS[1]  the user's index: a set of members (the secret parts of session ids)
-- ARGV[1]  the prefix of the user's session keys: a session is ARGV[1] .. member (the
--          user's sessions all carry the index's hash tag, so they share its slot)
-- returns  the members whose session existed and was deleted

local deleted = {}
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    if redis.call('DEL', ARGV[1] .. member) == 1 then
        deleted[#deleted + 1] = member
    end
end
redis.call('DEL', KEYS[1])
return deleted
