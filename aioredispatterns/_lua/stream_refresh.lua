-- Renew the entries a live consumer holds (buffered or being handled): reset their idle
-- time so that no other consumer claims them after claim_idle (a lease renewal), without
-- counting a delivery. XCLAIM with min-idle 0 resets the idle time; JUSTID leaves the
-- delivery counter alone. Only entries still pending for this consumer are touched: one
-- that another consumer claimed meanwhile (this one stalled) is left with it.
-- KEYS[1]  the stream
-- ARGV[1]  the group
-- ARGV[2]  the consumer that holds the entries
-- ARGV[3]… the ids of the entries it holds
-- returns  how many entries were renewed

local stream, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local claim = {'XCLAIM', stream, group, consumer, '0'}
for i = 3, #ARGV do
    local id = ARGV[i]
    if redis.call('XPENDING', stream, group, id, id, 1, consumer)[1] then
        table.insert(claim, id)
    end
end
if #claim == 5 then
    return 0
end
table.insert(claim, 'JUSTID')
return #redis.call(unpack(claim))
