-- Estimate distinct items per time bucket and over all of them (the union), for
-- consecutive buckets ending with a given bucket or the one that holds "now" on the
-- server's clock, in one step.
-- KEYS[1]  the series' base key (see unique_add.lua); bucket keys are
--          KEYS[1] .. ':' .. <bucket start>, union caches
--          KEYS[1] .. ':union:' .. <first start> .. ':' .. <last start>, all in KEYS[1]'s slot
-- ARGV[1]  the bucket width in seconds (an integer >= 1)
-- ARGV[2]  how many buckets (n >= 1), the last one included
-- ARGV[3]  the last bucket's index (floor(time / width)), or '' for the server's clock
-- ARGV[4]  the union cache's TTL in milliseconds, or '0' for no cache (PFCOUNT of all
--          the buckets' keys at once)
-- returns  {last bucket start in epoch seconds, union estimate, estimate of the oldest
--           bucket, ..., estimate of the last}
--
-- With a cache, the union is PFMERGEd once into its cache key with that TTL (written
-- together, so the cache never lives without one) and later calls PFCOUNT the cache until
-- it expires: items added meanwhile to those buckets are not in it. The client bounds n
-- (PFCOUNT and PFMERGE of n keys take unpack(), capped at a few thousand values, and
-- merge n HyperLogLogs of 12 KB each).

local width = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local last
if ARGV[3] == '' then
    local now = redis.call('TIME')
    last = math.floor(tonumber(now[1]) / width)
else
    last = tonumber(ARGV[3])
end
local prefix = KEYS[1] .. ':'
local keys = {}
local counts = {}
for index = last - n + 1, last do
    local key = prefix .. string.format('%d', index * width)
    keys[#keys + 1] = key
    counts[#counts + 1] = redis.call('PFCOUNT', key)
end
local union
local cache_ttl = tonumber(ARGV[4])
if n == 1 then
    union = counts[1]
elseif cache_ttl > 0 then
    local cache = prefix .. 'union:' .. string.format('%d', (last - n + 1) * width)
        .. ':' .. string.format('%d', last * width)
    if redis.call('EXISTS', cache) == 0 then
        redis.call('PFMERGE', cache, unpack(keys))
        redis.call('PEXPIRE', cache, ARGV[4])
    end
    union = redis.call('PFCOUNT', cache)
else
    union = redis.call('PFCOUNT', unpack(keys))
end
local reply = {last * width, union}
for i = 1, #counts do
    reply[#reply + 1] = counts[i]
end
return reply
