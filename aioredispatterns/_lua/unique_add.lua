-- Add items to the HyperLogLog of the time bucket that holds "now" on the server's clock
-- (or an explicit bucket), and set that bucket's expiry on every write.
-- KEYS[1]  the series' base key; it is never written itself. Bucket keys are
--          KEYS[1] .. ':' .. <bucket start in epoch seconds>: they share KEYS[1]'s hash
--          tag, so they live in its cluster slot (the client builds every key that way)
-- ARGV[1]  the bucket width in seconds (an integer >= 1)
-- ARGV[2]  retention: how long a bucket is kept after it ends, in milliseconds
-- ARGV[3]  the bucket index (floor(time / width)), or '' for the server's clock (TIME)
-- ARGV[4..] the items (at least one)
-- returns  {written (1, or 0 when the bucket had already expired: nothing written),
--           bucket start in epoch seconds, 1 if the bucket's estimate changed else 0}
--
-- PFADD takes the items in chunks: unpack() is capped at a few thousand values. The
-- expiry is absolute (PEXPIREAT bucket end + retention), as in bucket_incr.lua.

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local width = tonumber(ARGV[1])
local index
if ARGV[3] == '' then
    index = math.floor(tonumber(now[1]) / width)
else
    index = tonumber(ARGV[3])
end
local start = index * width
local expire_at = (start + width) * 1000 + tonumber(ARGV[2])
if expire_at <= now_ms then
    return {0, start, 0}
end
local key = KEYS[1] .. ':' .. string.format('%d', start)
local changed = 0
local chunk = 1000
for first = 4, #ARGV, chunk do
    local last = math.min(first + chunk - 1, #ARGV)
    if redis.call('PFADD', key, unpack(ARGV, first, last)) == 1 then
        changed = 1
    end
end
redis.call('PEXPIREAT', key, string.format('%d', expire_at))
return {1, start, changed}
