-- Return every job a consumer holds to the front of the queue: on a graceful stop (jobs
-- it fetched but never started do not count as a delivery) and on start (a restarted
-- consumer of the same name gets back what its previous run held, at once instead of
-- after the lease). Jobs that used up their deliveries are dead-lettered.
-- KEYS[1]  ready: list of job ids without priority
-- KEYS[2]  prio: sorted set of prioritized job ids (score -priority * 2^32 + sequence)
-- KEYS[3]  leases: sorted set, job id -> lease deadline (ms)
-- KEYS[4]  jobs: hash, job id -> payload
-- KEYS[5]  deliveries: hash, job id -> deliveries so far
-- KEYS[6]  owners: hash, job id -> the consumer holding its lease
-- KEYS[7]  errors: hash, job id -> the error of its last failed delivery
-- KEYS[8]  priorities: hash, job id -> priority (non-zero only)
-- KEYS[9]  dead: list of dead-lettered job ids (newest left)
-- KEYS[10] wake: sorted set of wake-up markers
-- KEYS[11] seq: the counter that keeps prioritized jobs first in, first out
-- KEYS[12] consumers: sorted set, consumer -> last heartbeat (ms)
-- KEYS[13] the consumer's processing list
-- ARGV[1]  the consumer
-- ARGV[2]  max deliveries: a job delivered that often is dead-lettered
-- ARGV[3]  the dead-letter list's bound ("0": unbounded)
-- ARGV[4]  "stop": the consumer leaves (a job not named below never started: its
--          delivery is not counted); "start": it (re)joins, every job counts as delivered
-- ARGV[5]  why (the error recorded on a dead-lettered job)
-- ARGV[6…] the ids of the jobs whose processing started
-- returns  {returned, dead-lettered}

local ready, prio, leases, jobs, deliveries, owners, errors, priorities, dead, wake, seq,
    consumers, processing = unpack(KEYS)
local consumer = ARGV[1]
local max_deliveries, dead_max = tonumber(ARGV[2]), tonumber(ARGV[3])
local stopping, why = ARGV[4] == 'stop', ARGV[5]
local started = {}
for i = 6, #ARGV do
    started[ARGV[i]] = true
end
local returned, dead_count = 0, 0
-- Newest first (the list's head), each pushed to the front (the right end, popped
-- next): the oldest ends up first, and the queue keeps their order.
local held = redis.call('LRANGE', processing, 0, -1)
for _, id in ipairs(held) do
    if redis.call('HGET', owners, id) == consumer then
        redis.call('ZREM', leases, id)
        redis.call('HDEL', owners, id)
        local n = tonumber(redis.call('HGET', deliveries, id) or '0')
        if stopping and not started[id] and n > 0 then
            n = n - 1
            if n == 0 then
                redis.call('HDEL', deliveries, id)
            else
                redis.call('HSET', deliveries, id, n)
            end
        end
        if redis.call('HEXISTS', jobs, id) == 0 then
            -- Removed meanwhile: nothing to return.
        elseif n >= max_deliveries then
            redis.call('HSET', errors, id, why .. ' after ' .. n .. ' deliveries')
            redis.call('LPUSH', dead, id)
            dead_count = dead_count + 1
        else
            local priority = redis.call('HGET', priorities, id)
            if priority then
                local order = redis.call('INCR', seq)
                redis.call('ZADD', prio, -tonumber(priority) * 4294967296 + order % 4294967296, id)
            else
                redis.call('RPUSH', ready, id)
            end
            returned = returned + 1
        end
    end
end
redis.call('DEL', processing)
if stopping then
    redis.call('ZREM', consumers, consumer)
else
    local now = redis.call('TIME')
    local now_ms = math.floor((tonumber(now[1]) * 1000000 + tonumber(now[2])) / 1000)
    redis.call('ZADD', consumers, now_ms, consumer)
end
if dead_count > 0 and dead_max > 0 then
    while redis.call('LLEN', dead) > dead_max do
        local old = redis.call('RPOP', dead)
        redis.call('HDEL', jobs, old)
        redis.call('HDEL', deliveries, old)
        redis.call('HDEL', errors, old)
        redis.call('HDEL', priorities, old)
    end
end
if returned > 0 then
    redis.call('ZADD', wake, 0, 'r')
end
return {returned, dead_count}
