-- Read the newest dead-lettered jobs with their payload, deliveries and last error.
-- KEYS[1]  dead: list of dead-lettered job ids (newest left)
-- KEYS[2]  jobs: hash, job id -> payload
-- KEYS[3]  deliveries: hash, job id -> deliveries so far
-- KEYS[4]  errors: hash, job id -> the error of its last failed delivery
-- ARGV[1]  how many at most
-- returns  {{id, payload, deliveries or nil, error or nil}, ...}, newest first

local dead, jobs, deliveries, errors = unpack(KEYS)
local ids = redis.call('LRANGE', dead, 0, tonumber(ARGV[1]) - 1)
local out = {}
if #ids == 0 then
    return out
end
local payloads = redis.call('HMGET', jobs, unpack(ids))
local counts = redis.call('HMGET', deliveries, unpack(ids))
local texts = redis.call('HMGET', errors, unpack(ids))
for i, id in ipairs(ids) do
    if payloads[i] then
        out[#out + 1] = {id, payloads[i], counts[i], texts[i]}
    end
end
return out
