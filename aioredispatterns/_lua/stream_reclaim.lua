-- Take over messages that sat unacknowledged too long in a consumer group (XAUTOCLAIM),
-- moving those that would now exceed their delivery budget to the dead-letter stream.
-- KEYS[1]  the stream
-- KEYS[2]  the dead-letter stream (same hash tag)
-- ARGV[1]  the group
-- ARGV[2]  the consumer that takes the messages over
-- ARGV[3]  minimum idle time, in milliseconds
-- ARGV[4]  the cursor to start from ("0-0" to begin a scan)
-- ARGV[5]  how many entries to claim at most (COUNT)
-- ARGV[6]  max deliveries: a claim that takes the delivery count above it dead-letters
-- ARGV[7]  approximate MAXLEN of the dead-letter stream ("0": unbounded)
-- returns  {next cursor, {{id, {field, value, ...}, deliveries}, ...}, dead-lettered count}

local stream, dead = KEYS[1], KEYS[2]
local group, consumer = ARGV[1], ARGV[2]
local max_deliveries = tonumber(ARGV[6])
local reply = redis.call('XAUTOCLAIM', stream, group, consumer, ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local claimed = {}
local dead_count = 0
for _, entry in ipairs(reply[2]) do
    -- Redis 6.2 reports an entry deleted from the stream (trimmed) without fields;
    -- 7.0+ drops those from the PEL itself and lists them apart.
    if type(entry) == 'table' then
        local id, fields = entry[1], entry[2]
        if not fields then
            redis.call('XACK', stream, group, id)
        else
            local pending = redis.call('XPENDING', stream, group, id, id, 1, consumer)
            local deliveries = 1
            if pending[1] then
                deliveries = tonumber(pending[1][4])
            end
            if deliveries > max_deliveries then
                local args = {dead}
                if ARGV[7] ~= '0' then
                    table.insert(args, 'MAXLEN')
                    table.insert(args, '~')
                    table.insert(args, ARGV[7])
                end
                for _, part in ipairs({'*', 'dlq:id', id, 'dlq:group', group,
                        'dlq:consumer', consumer, 'dlq:deliveries', tostring(deliveries - 1),
                        'dlq:error', 'not acknowledged after ' .. (deliveries - 1) .. ' deliveries'}) do
                    table.insert(args, part)
                end
                for _, part in ipairs(fields) do
                    table.insert(args, part)
                end
                redis.call('XADD', unpack(args))
                redis.call('XACK', stream, group, id)
                dead_count = dead_count + 1
            else
                table.insert(claimed, {id, fields, deliveries})
            end
        end
    end
end
return {reply[1], claimed, dead_count}
