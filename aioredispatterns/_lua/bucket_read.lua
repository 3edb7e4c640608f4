-- Read the counts of consecutive time buckets, ending with a given bucket or with the
-- one that holds "now" on the server's clock, in one step.
-- KEYS[1]  the series' base key (see bucket_incr.lua); bucket keys are
--          KEYS[1] .. ':' .. <bucket start in epoch seconds>, in KEYS[1]'s slot
-- ARGV[1]  the bucket width in seconds (an integer >= 1)
-- ARGV[2]  how many buckets (n >= 1), the last one included
-- ARGV[3]  the last bucket's index (floor(time / width)), or '' for the server's clock
-- returns  {last bucket start in epoch seconds, count of the oldest bucket, ..., count of
--           the last}: each count a bulk string, or nil for a bucket that does not exist
--
-- Read-only. One GET per bucket (MGET would need unpack(), which Lua caps at a few
-- thousand values); the client bounds n.

local width = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local last
if ARGV[3] == '' then
    local now = redis.call('TIME')
    last = math.floor(tonumber(now[1]) / width)
else
    last = tonumber(ARGV[3])
end
local reply = {last * width}
local prefix = KEYS[1] .. ':'
for index = last - n + 1, last do
    reply[#reply + 1] = redis.call('GET', prefix .. string.format('%d', index * width))
end
return reply
