-- Pre-warm one entry: write it unless a value (or cached "not found") is already there.
-- KEYS[1]  the entry
-- ARGV[1]  the new entry
-- ARGV[2]  its time to live in ms ('0': no expiry)
-- returns  1 if written, 0 if a live entry was kept
--
-- A tombstone (byte 1 is 0xA2) counts as absent: the warm value was computed now.
local current = redis.call('GET', KEYS[1])
if current and string.byte(current, 1) ~= 0xA2 then
    return 0
end
if ARGV[2] ~= '0' then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
    redis.call('SET', KEYS[1], ARGV[1])
end
return 1
