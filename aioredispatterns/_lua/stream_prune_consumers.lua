-- Remove consumers of a group that have been idle a long time and own no pending entry.
-- Checked and deleted in one script, so a consumer cannot gain a pending entry between
-- the check and XGROUP DELCONSUMER (which would drop that entry from the PEL).
-- KEYS[1]  the stream
-- ARGV[1]  the group
-- ARGV[2]  minimum idle time, in milliseconds
-- ARGV[3]  a consumer never to remove (the caller itself)
-- returns  the names of the removed consumers

local removed = {}
local min_idle = tonumber(ARGV[2])
for _, flat in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local info = {}
    for i = 1, #flat, 2 do
        info[flat[i]] = flat[i + 1]
    end
    if info['name'] ~= ARGV[3] and tonumber(info['pending']) == 0
            and tonumber(info['idle']) >= min_idle then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
        table.insert(removed, info['name'])
    end
end
return removed
