-- Renew the leases of the jobs a live consumer holds (and record its heartbeat): each
-- job it still owns gets a fresh deadline; a job it no longer owns (its lease ran out
-- and it was returned to the queue) leaves its processing list and is reported lost.
-- KEYS[1]  leases: sorted set, job id -> lease deadline (ms)
-- KEYS[2]  owners: hash, job id -> the consumer holding its lease
-- KEYS[3]  consumers: sorted set, consumer -> last heartbeat (ms)
-- KEYS[4]  the consumer's processing list
-- ARGV[1]  the consumer
-- ARGV[2]  the lease, in ms
-- ARGV[3…] the job ids it holds
-- returns  the ids of the jobs it no longer owns

local leases, owners, consumers, processing = unpack(KEYS)
local consumer = ARGV[1]
local now = redis.call('TIME')
local now_ms = math.floor((tonumber(now[1]) * 1000000 + tonumber(now[2])) / 1000)
redis.call('ZADD', consumers, now_ms, consumer)
local ids = {}
for i = 3, #ARGV do
    ids[#ids + 1] = ARGV[i]
end
if #ids == 0 then
    return {}
end
local deadline = now_ms + tonumber(ARGV[2])
local holders = redis.call('HMGET', owners, unpack(ids))
local renewed, lost = {}, {}
for i, id in ipairs(ids) do
    if holders[i] == consumer then
        renewed[#renewed + 1] = deadline
        renewed[#renewed + 1] = id
    else
        lost[#lost + 1] = id
        redis.call('LREM', processing, -1, id)
    end
end
if #renewed > 0 then
    redis.call('ZADD', leases, unpack(renewed))
end
return lost
