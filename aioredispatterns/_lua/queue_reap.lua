-- Return the jobs whose lease ran out (their consumer died, stalled or lost the server)
-- to the front of the queue with their delivery count, or dead-letter those that used
-- up their deliveries; report when the next lease runs out and which consumers have
-- been silent for long.
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
-- ARGV[1]  how many expired leases to handle at most
-- ARGV[2]  max deliveries: a job delivered that often is dead-lettered
-- ARGV[3]  the dead-letter list's bound ("0": unbounded)
-- ARGV[4]  ms without a heartbeat after which a consumer counts as gone
-- returns  {returned, dead-lettered, ms until the next lease runs out (-1: none),
--          {consumers silent for longer than ARGV[4]}}

local ready, prio, leases, jobs, deliveries, owners, errors, priorities, dead, wake, seq,
    consumers = unpack(KEYS)
local max_deliveries, dead_max = tonumber(ARGV[2]), tonumber(ARGV[3])
local now = redis.call('TIME')
local now_ms = math.floor((tonumber(now[1]) * 1000000 + tonumber(now[2])) / 1000)

local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
local returned, dead_count = 0, 0
-- Each goes to the front (the right end, popped next), latest deadline first: the one
-- whose lease ran out first is taken first.
for i = #expired, 1, -1 do
    local id = expired[i]
    local owner = redis.call('HGET', owners, id) or '?'
    redis.call('ZREM', leases, id)
    redis.call('HDEL', owners, id)
    local n = tonumber(redis.call('HGET', deliveries, id) or '0')
    if redis.call('HEXISTS', jobs, id) == 0 then
        -- Removed meanwhile: nothing to return.
    elseif n >= max_deliveries then
        redis.call('HSET', errors, id,
            'lease expired on consumer ' .. owner .. ' after ' .. n .. ' deliveries')
        redis.call('LPUSH', dead, id)
        dead_count = dead_count + 1
    else
        redis.call('HSET', errors, id, 'lease expired on consumer ' .. owner)
        local priority = redis.call('HGET', priorities, id)
        if priority then
            local order = redis.call('INCR', seq)
            redis.call('ZADD', prio, -tonumber(priority) * 4294967296 + order % 4294967296, id)
        else
            -- The front of the queue: it has waited long enough.
            redis.call('RPUSH', ready, id)
        end
        returned = returned + 1
    end
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

local next_ms = -1
local first = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
if first[1] then
    next_ms = math.max(tonumber(first[2]) - now_ms, 0)
end
local silent = redis.call('ZRANGEBYSCORE', consumers, '-inf', now_ms - tonumber(ARGV[4]),
    'LIMIT', 0, 10)
return {returned, dead_count, next_ms, silent}
