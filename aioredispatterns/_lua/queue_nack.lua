-- A consumer failed a job it holds: record the error, then dead-letter the job if it
-- used up its deliveries, else return it to the queue, at once or after a delay.
-- KEYS[1]  ready: list of job ids without priority
-- KEYS[2]  prio: sorted set of prioritized job ids (score -priority * 2^32 + sequence)
-- KEYS[3]  delayed: sorted set of job ids by due time (ms)
-- KEYS[4]  leases: sorted set, job id -> lease deadline (ms)
-- KEYS[5]  jobs: hash, job id -> payload
-- KEYS[6]  deliveries: hash, job id -> deliveries so far
-- KEYS[7]  owners: hash, job id -> the consumer holding its lease
-- KEYS[8]  errors: hash, job id -> the error of its last failed delivery
-- KEYS[9]  priorities: hash, job id -> priority (non-zero only)
-- KEYS[10] dead: list of dead-lettered job ids (newest left)
-- KEYS[11] wake: sorted set of wake-up markers
-- KEYS[12] seq: the counter that keeps prioritized jobs first in, first out
-- KEYS[13] the consumer's processing list
-- ARGV[1]  the consumer
-- ARGV[2]  the job id
-- ARGV[3]  the error text
-- ARGV[4]  retry delay in µs ("0": ready at once; "-1": dead-letter now)
-- ARGV[5]  max deliveries: a job delivered that often is dead-lettered
-- ARGV[6]  the dead-letter list's bound ("0": unbounded)
-- returns  0 if the consumer no longer held the job (nothing changed), 1 if it was
--          returned to the queue, 2 if it was dead-lettered

local ready, prio, delayed, leases, jobs, deliveries, owners, errors, priorities, dead,
    wake, seq, processing = unpack(KEYS)
local consumer, id, error = ARGV[1], ARGV[2], ARGV[3]
local retry_us, max_deliveries, dead_max = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('LREM', processing, -1, id)
if redis.call('HGET', owners, id) ~= consumer then
    return 0
end
redis.call('ZREM', leases, id)
redis.call('HDEL', owners, id)
redis.call('HSET', errors, id, error)
local n = tonumber(redis.call('HGET', deliveries, id) or '0')
if retry_us < 0 or n >= max_deliveries then
    redis.call('LPUSH', dead, id)
    if dead_max > 0 then
        while redis.call('LLEN', dead) > dead_max do
            local old = redis.call('RPOP', dead)
            redis.call('HDEL', jobs, old)
            redis.call('HDEL', deliveries, old)
            redis.call('HDEL', errors, old)
            redis.call('HDEL', priorities, old)
        end
    end
    return 2
end
if retry_us > 0 then
    local now = redis.call('TIME')
    local due = math.ceil((tonumber(now[1]) * 1000000 + tonumber(now[2]) + retry_us) / 1000)
    redis.call('ZADD', delayed, due, id)
    redis.call('ZADD', wake, 'LT', due, 'd')
    return 1
end
local priority = redis.call('HGET', priorities, id)
if priority then
    local order = redis.call('INCR', seq)
    redis.call('ZADD', prio, -tonumber(priority) * 4294967296 + order % 4294967296, id)
else
    redis.call('LPUSH', ready, id)
end
redis.call('ZADD', wake, 0, 'r')
return 1
