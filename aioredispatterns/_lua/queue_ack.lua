-- Acknowledge jobs a consumer finished: those it still holds are deleted with their
-- lease; every id leaves its processing list. A job whose lease this consumer lost (it
-- was returned to the queue, perhaps delivered elsewhere) is left alone, so acking is
-- idempotent and a late ack never deletes another consumer's delivery.
-- KEYS[1]  leases: sorted set, job id -> lease deadline (ms)
-- KEYS[2]  jobs: hash, job id -> payload
-- KEYS[3]  deliveries: hash, job id -> deliveries so far
-- KEYS[4]  owners: hash, job id -> the consumer holding its lease
-- KEYS[5]  errors: hash, job id -> the error of its last failed delivery
-- KEYS[6]  priorities: hash, job id -> priority
-- KEYS[7]  the consumer's processing list
-- ARGV[1]  the consumer
-- ARGV[2…] the job ids
-- returns  how many jobs were acknowledged (held by this consumer until now)

local leases, jobs, deliveries, owners, errors, priorities, processing = unpack(KEYS)
local consumer = ARGV[1]
local ids = {}
for i = 2, #ARGV do
    ids[#ids + 1] = ARGV[i]
end
if #ids == 0 then
    return 0
end
local holders = redis.call('HMGET', owners, unpack(ids))
local mine = {}
for i, id in ipairs(ids) do
    if holders[i] == consumer then
        mine[#mine + 1] = id
    end
    -- From the tail: the oldest jobs, the ones usually finished first, are there.
    redis.call('LREM', processing, -1, id)
end
if #mine > 0 then
    redis.call('ZREM', leases, unpack(mine))
    redis.call('HDEL', jobs, unpack(mine))
    redis.call('HDEL', deliveries, unpack(mine))
    redis.call('HDEL', owners, unpack(mine))
    redis.call('HDEL', errors, unpack(mine))
    redis.call('HDEL', priorities, unpack(mine))
end
return #mine
