-- One member's place on a leaderboard and the entries around it, read atomically.
-- KEYS[1]  the board: a sorted set, member -> score
-- ARGV[1]  the best end: 'high' (ranks by ZREVRANK / ZREVRANGE) or 'low' (ZRANK / ZRANGE)
-- ARGV[2]  the member
-- ARGV[3]  the radius: how many entries above and below the member (0: the member alone)
-- returns  nil when the member is not on the board; else {start, entries}: the 0-based
--          rank of the window's first entry and a flat member, score, member, score ...
--          list (scores as strings, exactly as the server stores them)
--
-- Near the top or the bottom the window shifts rather than shrinks, so it holds
-- 2 * radius + 1 entries whenever the board has that many.

local key = KEYS[1]
local high = ARGV[1] == 'high'
local rank = redis.call(high and 'ZREVRANK' or 'ZRANK', key, ARGV[2])
if not rank then
    return false
end
local radius = tonumber(ARGV[3])
local last = redis.call('ZCARD', key) - 1
local start, stop = rank - radius, rank + radius
if start < 0 then
    stop = math.min(last, stop - start)
    start = 0
end
if stop > last then
    start = math.max(0, start - (stop - last))
    stop = last
end
local entries = redis.call(high and 'ZREVRANGE' or 'ZRANGE', key, start, stop, 'WITHSCORES')
return {start, entries}
