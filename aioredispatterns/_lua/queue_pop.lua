-- Take up to COUNT jobs for one consumer: move the delayed jobs that are due (server
-- clock) to the ready ones, then take the highest priority first (first in, first out
-- within a priority), lease each job to the consumer and count its delivery.
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
-- KEYS[13] consumers: sorted set, consumer -> last heartbeat (ms)
-- KEYS[14] this consumer's processing list (job ids it holds, newest left)
-- ARGV[1]  the consumer
-- ARGV[2]  COUNT: jobs to take at most ("0": only move the due delayed jobs)
-- ARGV[3]  the lease, in ms
-- ARGV[4]  max deliveries: a job delivered that often already is dead-lettered instead
-- ARGV[5]  the dead-letter list's bound ("0": unbounded)
-- ARGV[6]  how many due delayed jobs to move at most
-- returns  {{{id, payload, deliveries, priority, last error or nil}, ...}, ms until the
--          next delayed job is due (-1: none)}

local ready, prio, delayed, leases, jobs, deliveries, owners, errors, priorities, dead,
    wake, seq, consumers, processing = unpack(KEYS)
local consumer, count, lease_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local max_deliveries, dead_max = tonumber(ARGV[4]), tonumber(ARGV[5])
local now = redis.call('TIME')
local now_ms = math.floor((tonumber(now[1]) * 1000000 + tonumber(now[2])) / 1000)

local function make_ready(id)
    local priority = redis.call('HGET', priorities, id)
    if priority then
        local n = redis.call('INCR', seq)
        redis.call('ZADD', prio, -tonumber(priority) * 4294967296 + n % 4294967296, id)
    else
        redis.call('LPUSH', ready, id)
    end
end

local function dead_letter(id, error)
    redis.call('HSET', errors, id, error)
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
end

-- Due delayed jobs join the ready ones (behind those already waiting).
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[6]))
if #due > 0 then
    redis.call('ZREM', delayed, unpack(due))
    for _, id in ipairs(due) do
        make_ready(id)
    end
end

local taken = {}
if count > 0 then
    local high = redis.call('ZRANGEBYSCORE', prio, '-inf', '(0', 'LIMIT', 0, count)
    for _, id in ipairs(high) do
        taken[#taken + 1] = id
    end
    if #taken < count then
        local plain = redis.call('RPOP', ready, count - #taken)
        if plain then
            for _, id in ipairs(plain) do
                taken[#taken + 1] = id
            end
        end
    end
    if #taken < count then
        local low = redis.call('ZRANGEBYSCORE', prio, 0, '+inf', 'LIMIT', 0, count - #taken)
        for _, id in ipairs(low) do
            taken[#taken + 1] = id
            high[#high + 1] = id
        end
    end
    if #high > 0 then
        redis.call('ZREM', prio, unpack(high))
    end
end

local out, leased, owned, held = {}, {}, {}, {}
local deadline = now_ms + lease_ms
if #taken > 0 then
    local payloads = redis.call('HMGET', jobs, unpack(taken))
    local last_errors = redis.call('HMGET', errors, unpack(taken))
    local levels = redis.call('HMGET', priorities, unpack(taken))
    for i, id in ipairs(taken) do
        -- A job without a payload was removed meanwhile: nothing to deliver.
        if payloads[i] then
            local n = redis.call('HINCRBY', deliveries, id, 1)
            if n > max_deliveries then
                dead_letter(id, 'delivered more than max_deliveries=' .. max_deliveries .. ' times')
            else
                out[#out + 1] = {id, payloads[i], n, levels[i] or 0, last_errors[i]}
                leased[#leased + 1] = deadline
                leased[#leased + 1] = id
                owned[#owned + 1] = id
                owned[#owned + 1] = consumer
                held[#held + 1] = id
            end
        end
    end
end
if #held > 0 then
    redis.call('ZADD', leases, unpack(leased))
    redis.call('HSET', owners, unpack(owned))
    redis.call('LPUSH', processing, unpack(held))
end
redis.call('ZADD', consumers, now_ms, consumer)

-- Work left for others (a full batch, or due jobs this consumer did not take): wake
-- the next consumer blocked on the markers.
if #due > 0 or (count > 0 and #taken == count) then
    if redis.call('LLEN', ready) > 0 or redis.call('ZCARD', prio) > 0 then
        redis.call('ZADD', wake, 0, 'r')
    end
end

local wait = -1
local first = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
if first[1] then
    wait = math.max(tonumber(first[2]) - now_ms, 0)
end
return {out, wait}
