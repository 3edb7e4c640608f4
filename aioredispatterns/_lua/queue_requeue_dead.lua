-- Give dead-lettered jobs another chance: back to the queue (behind the waiting jobs)
-- with a fresh delivery count; their last error is kept.
-- KEYS[1]  dead: list of dead-lettered job ids (newest left)
-- KEYS[2]  ready: list of job ids without priority
-- KEYS[3]  prio: sorted set of prioritized job ids (score -priority * 2^32 + sequence)
-- KEYS[4]  jobs: hash, job id -> payload
-- KEYS[5]  deliveries: hash, job id -> deliveries so far
-- KEYS[6]  priorities: hash, job id -> priority (non-zero only)
-- KEYS[7]  wake: sorted set of wake-up markers
-- KEYS[8]  seq: the counter that keeps prioritized jobs first in, first out
-- ARGV[1]  how many of the oldest to requeue when no id is given
-- ARGV[2…] the job ids to requeue (none: the oldest ARGV[1])
-- returns  how many jobs were requeued

local dead, ready, prio, jobs, deliveries, priorities, wake, seq = unpack(KEYS)
local ids = {}
if #ARGV > 1 then
    for i = 2, #ARGV do
        if redis.call('LREM', dead, 1, ARGV[i]) > 0 then
            ids[#ids + 1] = ARGV[i]
        end
    end
else
    for _ = 1, tonumber(ARGV[1]) do
        local id = redis.call('RPOP', dead)
        if not id then
            break
        end
        ids[#ids + 1] = id
    end
end
local requeued = 0
for _, id in ipairs(ids) do
    if redis.call('HEXISTS', jobs, id) == 1 then
        redis.call('HDEL', deliveries, id)
        local priority = redis.call('HGET', priorities, id)
        if priority then
            local order = redis.call('INCR', seq)
            redis.call('ZADD', prio, -tonumber(priority) * 4294967296 + order % 4294967296, id)
        else
            redis.call('LPUSH', ready, id)
        end
        requeued = requeued + 1
    end
end
if requeued > 0 then
    redis.call('ZADD', wake, 0, 'r')
end
return requeued
