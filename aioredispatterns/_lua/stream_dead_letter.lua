-- Move one pending message to the dead-letter stream and acknowledge it, atomically,
-- provided the calling consumer still owns it (nobody reclaimed it meanwhile).
-- KEYS[1]  the stream
-- KEYS[2]  the dead-letter stream (same hash tag)
-- ARGV[1]  the group
-- ARGV[2]  the consumer that must own the message
-- ARGV[3]  the message id
-- ARGV[4]  how many times it was delivered
-- ARGV[5]  the error text of the last failed delivery
-- ARGV[6]  approximate MAXLEN of the dead-letter stream ("0": unbounded)
-- returns  1 if the message was moved, 0 if it is no longer pending for this consumer

local stream, dead, id = KEYS[1], KEYS[2], ARGV[3]
local pending = redis.call('XPENDING', stream, ARGV[1], id, id, 1, ARGV[2])
if not pending[1] then
    return 0
end
local args = {dead}
if ARGV[6] ~= '0' then
    table.insert(args, 'MAXLEN')
    table.insert(args, '~')
    table.insert(args, ARGV[6])
end
for _, part in ipairs({'*', 'dlq:id', id, 'dlq:group', ARGV[1], 'dlq:consumer', ARGV[2],
        'dlq:deliveries', ARGV[4], 'dlq:error', ARGV[5]}) do
    table.insert(args, part)
end
local found = redis.call('XRANGE', stream, id, id)
if found[1] then
    for _, part in ipairs(found[1][2]) do
        table.insert(args, part)
    end
end
redis.call('XADD', unpack(args))
redis.call('XACK', stream, ARGV[1], id)
return 1
