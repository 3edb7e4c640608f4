-- Write a value only if the writer's fencing token is not older than the newest seen.
-- KEYS[1]  the resource: a hash with fields "value" and "token"
-- ARGV[1]  the value
-- ARGV[2]  the writer's fencing token: a decimal integer in [0, 2**64 - 1], written
--          without sign or leading zeros (what str(int) gives)
-- returns  1 if written (ARGV[2] >= the stored token), 0 if rejected as stale;
--          an error if ARGV[2], or the stored token, is not such a decimal integer
--
-- Tokens are compared as decimal strings, never as Lua numbers: those are doubles, exact
-- only up to 2**53, so 2**64 - 1 and 2**64 - 2 would compare equal and 10**400 would be
-- inf. Without leading zeros the longer string is the larger number; two strings of one
-- length compare chunk by chunk, each chunk of at most 15 digits exact as a double (no
-- string '<': it follows the server's locale). The token is stored as received, so a
-- token stored by an earlier version (str(int) too) compares the same way.

local MAX = '18446744073709551615'  -- 2**64 - 1

local function decimal(s)
    return s == '0' or string.find(s, '^[1-9]%d*$') ~= nil
end

local function less(a, b)
    if #a ~= #b then return #a < #b end
    for i = 1, #a, 15 do
        local x = tonumber(string.sub(a, i, i + 14))
        local y = tonumber(string.sub(b, i, i + 14))
        if x ~= y then return x < y end
    end
    return false
end

local token = ARGV[2]
if not decimal(token) or less(MAX, token) then
    return redis.error_reply('ERR fenced_set: the token must be a decimal integer in ' ..
        '[0, 18446744073709551615], got "' .. string.sub(token, 1, 40) .. '"')
end
local seen = redis.call('HGET', KEYS[1], 'token')
if seen then
    if not decimal(seen) then
        return redis.error_reply('ERR fenced_set: the stored token is not a decimal ' ..
            'integer: "' .. string.sub(seen, 1, 40) .. '"')
    end
    if less(token, seen) then
        return 0
    end
end
redis.call('HSET', KEYS[1], 'value', ARGV[1], 'token', token)
return 1
