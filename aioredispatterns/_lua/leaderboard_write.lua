-- Write scores to a leaderboard, then keep only its best max_size members, atomically.
-- KEYS[1]  the board: a sorted set, member -> score
-- ARGV[1]  'set' (set each pair's score) or 'incr' (one pair: add its number to the score)
-- ARGV[2]  condition of 'set': '' (always), 'gt' (only a higher score), 'lt' (only lower)
-- ARGV[3]  the cap: keep at most this many members ('0': no cap)
-- ARGV[4]  the best end: 'high' (the cap drops the lowest scores) or 'low' (the highest)
-- ARGV[5], ARGV[6], ...  member, score pairs (each member once)
-- returns  {changed, trimmed, score}: members whose score this call changed and that are
--          still on the board, members the cap removed, and for 'incr' the new score as a
--          string (nil for 'set': a Lua number would be truncated to an integer reply)
--
-- The cap drops the entries ranked last: for a 'high' board the lowest scores, and among
-- equal scores the member that sorts first byte-wise (ZREVRANGE shows it last); for a
-- 'low' board the highest scores, and among equal ones the member that sorts last. So a
-- newcomer that ties the last entry of a full board is compared by name, like any rank.
-- Scores travel as strings and are compared with tonumber(): both that and the server
-- parse them with strtod, so the comparison sees exactly the doubles the set stores.

local key = KEYS[1]
local mode, condition = ARGV[1], ARGV[2]
local cap = tonumber(ARGV[3])
local written = {}
local new_score = false

if mode == 'incr' then
    new_score = redis.call('ZINCRBY', key, ARGV[6], ARGV[5])
    written[1] = ARGV[5]
else
    for i = 5, #ARGV, 2 do
        local member, score = ARGV[i], ARGV[i + 1]
        local current = redis.call('ZSCORE', key, member)
        local write = true
        if current then
            local old, new = tonumber(current), tonumber(score)
            if condition == 'gt' then
                write = new > old
            elseif condition == 'lt' then
                write = new < old
            else
                write = new ~= old
            end
        end
        if write then
            redis.call('ZADD', key, score, member)
            written[#written + 1] = member
        end
    end
end

local trimmed = 0
if cap > 0 then
    local excess = redis.call('ZCARD', key) - cap
    if excess > 0 then
        if ARGV[4] == 'high' then
            trimmed = redis.call('ZREMRANGEBYRANK', key, 0, excess - 1)
        else
            trimmed = redis.call('ZREMRANGEBYRANK', key, -excess, -1)
        end
    end
end

local changed = #written
if trimmed > 0 then
    changed = 0
    for _, member in ipairs(written) do
        if redis.call('ZSCORE', key, member) then changed = changed + 1 end
    end
end
return {changed, trimmed, new_score}
