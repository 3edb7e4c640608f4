-- Forget a consumer that has been silent for long (it died without stopping): drop its
-- processing list and its heartbeat, once none of its jobs is still leased to it (the
-- reaper returns those when their leases run out).
-- KEYS[1]  owners: hash, job id -> the consumer holding its lease
-- KEYS[2]  consumers: sorted set, consumer -> last heartbeat (ms)
-- KEYS[3]  the silent consumer's processing list
-- ARGV[1]  the consumer
-- ARGV[2]  ms without a heartbeat after which a consumer counts as gone
-- returns  1 if it was forgotten, 0 if not (it came back, or still holds leases)

local owners, consumers, processing = unpack(KEYS)
local consumer = ARGV[1]
local now = redis.call('TIME')
local now_ms = math.floor((tonumber(now[1]) * 1000000 + tonumber(now[2])) / 1000)
local beat = redis.call('ZSCORE', consumers, consumer)
if beat and tonumber(beat) > now_ms - tonumber(ARGV[2]) then
    return 0
end
local held = redis.call('LRANGE', processing, 0, -1)
for _, id in ipairs(held) do
    if redis.call('HGET', owners, id) == consumer then
        return 0
    end
end
redis.call('DEL', processing)
redis.call('ZREM', consumers, consumer)
return 1
