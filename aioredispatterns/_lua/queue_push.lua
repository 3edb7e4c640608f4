-- Add jobs to a reliable queue; a job whose id the queue already knows is left alone
-- (waiting, delayed, in flight or dead: an explicit job id makes a push idempotent).
-- KEYS[1]  ready: list of job ids without priority (pushed left, popped right)
-- KEYS[2]  prio: sorted set of prioritized job ids (score -priority * 2^32 + sequence)
-- KEYS[3]  delayed: sorted set of job ids by due time (server ms)
-- KEYS[4]  jobs: hash, job id -> payload
-- KEYS[5]  priorities: hash, job id -> priority (non-zero only)
-- KEYS[6]  wake: sorted set of wake-up markers ('r': work is ready; 'd': a due time)
-- KEYS[7]  seq: the counter that keeps prioritized jobs first in, first out
-- ARGV[1]  how many jobs n; then n times: id, payload, priority, delay (µs, "0": none)
-- returns  for each job, 1 if added, 0 if its id was already known

local ready, prio, delayed, jobs, priorities, wake, seq =
    KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local added, plain = {}, {}
local woken, earliest = false, nil
for i = 0, tonumber(ARGV[1]) - 1 do
    local base = 2 + 4 * i
    local id = ARGV[base]
    local priority, delay = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
    if redis.call('HSETNX', jobs, id, ARGV[base + 1]) == 1 then
        added[i + 1] = 1
        if priority ~= 0 then
            redis.call('HSET', priorities, id, priority)
        end
        if delay > 0 then
            -- Rounded up to the millisecond: a job never becomes due early.
            local due = math.ceil((now_us + delay) / 1000)
            redis.call('ZADD', delayed, due, id)
            if earliest == nil or due < earliest then
                earliest = due
            end
        elseif priority ~= 0 then
            local n = redis.call('INCR', seq)
            redis.call('ZADD', prio, -priority * 4294967296 + n % 4294967296, id)
            woken = true
        else
            plain[#plain + 1] = id
        end
    else
        added[i + 1] = 0
    end
end
if #plain > 0 then
    redis.call('LPUSH', ready, unpack(plain))
    woken = true
end
if woken then
    redis.call('ZADD', wake, 0, 'r')
end
if earliest ~= nil then
    -- A consumer blocked on the markers wakes and times its wait to the new due time.
    redis.call('ZADD', wake, 'LT', earliest, 'd')
end
return added
