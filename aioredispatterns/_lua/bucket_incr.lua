-- Add to the time bucket that holds "now" on the server's clock (or an explicit bucket),
-- and set that bucket's expiry on every write.
-- KEYS[1]  the series' base key; it is never written itself. Bucket keys are
--          KEYS[1] .. ':' .. <bucket start in epoch seconds>: they share KEYS[1]'s hash
--          tag, so they live in its cluster slot (the client builds every key that way)
-- ARGV[1]  the amount to add (an integer, passed to INCRBY as the client's string)
-- ARGV[2]  the bucket width in seconds (an integer >= 1)
-- ARGV[3]  retention: how long a bucket is kept after it ends, in milliseconds
-- ARGV[4]  the bucket index (floor(time / width)), or '' for the server's clock (TIME)
-- returns  {written (1, or 0 when the bucket had already expired: nothing written),
--           bucket start in epoch seconds, the bucket's count after the write (0 when
--           nothing was written)}
--
-- Expiry is absolute (PEXPIREAT bucket end + retention, on the server's clock), so it is
-- the same whichever write set it last, and it is set again by every write (a bucket
-- whose TTL was removed gets it back). Numbers: a bucket index times the width is at most
-- ~2.6e11 s and an expiry at most ~6e14 ms, far below 2**53, so Lua's doubles are exact.

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local width = tonumber(ARGV[2])
local index
if ARGV[4] == '' then
    index = math.floor(tonumber(now[1]) / width)
else
    index = tonumber(ARGV[4])
end
local start = index * width
local expire_at = (start + width) * 1000 + tonumber(ARGV[3])
if expire_at <= now_ms then
    return {0, start, 0}
end
local key = KEYS[1] .. ':' .. string.format('%d', start)
local count = redis.call('INCRBY', key, ARGV[1])
redis.call('PEXPIREAT', key, string.format('%d', expire_at))
return {1, start, count}
