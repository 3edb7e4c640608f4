-- Decide one rate-limit request against one or more limits of one identity, atomically,
-- on the server's clock (TIME). Either every limit consumes `cost` or none does.
-- KEYS[i]      the state key of limit i (all keys share the identity's hash tag)
-- ARGV[1]      mode: 1 = hit (consume if every limit allows), 0 = peek (never writes)
-- ARGV[2]      cost: units to consume (a positive integer)
-- ARGV[3+3(i-1) .. 5+3(i-1)]  limit i: kind, size, interval_us
--              kind 1 token bucket   size = capacity, interval_us = microseconds per token
--              kind 2 GCRA           size = burst,    interval_us = emission interval
--              kind 3 sliding log    size = limit,    interval_us = window
--              kind 4 sliding counter size = limit,   interval_us = window
--              kind 5 fixed window   size = limit,    interval_us = window
-- returns      {allowed (0/1), server time in us, then per limit i:
--               allowed_i, remaining_i, retry_after_us_i, reset_after_us_i}
-- Every write sets a TTL (PEXPIRE) in the same call; a denied request or a peek writes
-- nothing, so a key never lives without a TTL.

local mode = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local function ms(us)
    local v = math.ceil(us / 1000)
    if v < 1 then v = 1 end
    return v
end

local function int(x)
    return string.format('%.0f', x)
end

local function num(x)
    return string.format('%.17g', x)
end

-- Each evaluator returns ok, remaining now, retry_us, reset_us now, and when ok also
-- remaining and reset_us after consuming, and the commit function that consumes.

local function token_bucket(key, capacity, interval)
    local data = redis.call('HMGET', key, 't', 'ts')
    local tokens = tonumber(data[1])
    local ts = tonumber(data[2])
    if tokens == nil or ts == nil then
        tokens = capacity
    else
        local elapsed = now - ts
        if elapsed < 0 then elapsed = 0 end
        tokens = math.min(capacity, tokens + elapsed / interval)
    end
    if tokens >= cost then
        local left = tokens - cost
        local reset = (capacity - left) * interval
        return true, math.floor(tokens), 0, (capacity - tokens) * interval,
            math.floor(left), reset, function()
            redis.call('HSET', key, 't', num(left), 'ts', int(now))
            redis.call('PEXPIRE', key, ms(reset))
        end
    end
    return false, math.floor(tokens), (cost - tokens) * interval, (capacity - tokens) * interval
end

local function gcra(key, burst, interval)
    local tat = tonumber(redis.call('GET', key))
    if tat == nil or tat < now then tat = now end
    local new_tat = tat + cost * interval
    local allow_at = new_tat - burst * interval
    if allow_at <= now then
        local reset = new_tat - now
        local left = math.floor((now - allow_at) / interval + 1e-9)
        return true, left + cost, 0, tat - now, left, reset, function()
            redis.call('SET', key, num(new_tat), 'PX', ms(reset))
        end
    end
    local remaining = math.floor((now + burst * interval - tat) / interval + 1e-9)
    if remaining < 0 then remaining = 0 end
    return false, remaining, allow_at - now, tat - now
end

local function sliding_log(key, limit, window)
    local floor_score = '(' .. int(now - window)
    local count = redis.call('ZCOUNT', key, floor_score, '+inf')
    local reset = 0
    local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    if newest[2] then reset = math.max(0, tonumber(newest[2]) + window - now) end
    if count + cost <= limit then
        return true, limit - count, 0, reset, limit - count - cost, window, function()
            redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now - window))
            local score = int(now)
            local args = {}
            for i = 1, cost do
                args[#args + 1] = score
                -- Unique within one microsecond: the in-window count only grows there.
                args[#args + 1] = score .. ':' .. (count + i)
            end
            redis.call('ZADD', key, unpack(args))
            redis.call('PEXPIRE', key, ms(window))
        end
    end
    local retry = window
    local need = count + cost - limit
    local oldest = redis.call('ZRANGEBYSCORE', key, floor_score, '+inf', 'WITHSCORES',
        'LIMIT', need - 1, 1)
    if oldest[2] then retry = tonumber(oldest[2]) + window - now end
    return false, limit - count, retry, reset
end

local function sliding_counter(key, limit, window)
    local idx = math.floor(now / window)
    local start = idx * window
    local data = redis.call('HMGET', key, 'w', 'c', 'p')
    local w = tonumber(data[1])
    local cur, prev = 0, 0
    if w == idx then
        cur, prev = tonumber(data[2]) or 0, tonumber(data[3]) or 0
    elseif w == idx - 1 then
        prev = tonumber(data[2]) or 0
    end
    local estimate = prev * (1 - (now - start) / window) + cur
    local remaining = math.floor(limit - estimate + 1e-9)
    if remaining < 0 then remaining = 0 end
    -- The current window's count weighs until the end of the next one.
    local reset = 0
    if cur > 0 then reset = start + 2 * window - now
    elseif prev > 0 then reset = start + window - now end
    if estimate + cost <= limit then
        local after = start + 2 * window - now
        return true, remaining, 0, reset, remaining - cost, after, function()
            redis.call('HSET', key, 'w', int(idx), 'c', cur + cost, 'p', prev)
            redis.call('PEXPIRE', key, ms(after))
        end
    end
    local retry
    if cur + cost > limit then
        -- Wait for the next window, then for this window's weight to fade enough.
        local f = 1 - (limit - cost) / cur
        if f < 0 then f = 0 end
        retry = start + window + f * window - now
    else
        retry = start + (1 - (limit - cur - cost) / prev) * window - now
    end
    -- One microsecond more: the estimate is a float and must be within the limit then.
    return false, remaining, retry + 1, reset
end

local function fixed_window(key, limit, window)
    local idx = math.floor(now / window)
    local finish = (idx + 1) * window
    local data = redis.call('HMGET', key, 'w', 'c')
    local cur = 0
    if tonumber(data[1]) == idx then cur = tonumber(data[2]) or 0 end
    local reset = 0
    if cur > 0 then reset = finish - now end
    if cur + cost <= limit then
        return true, limit - cur, 0, reset, limit - cur - cost, finish - now, function()
            redis.call('HSET', key, 'w', int(idx), 'c', cur + cost)
            redis.call('PEXPIRE', key, ms(finish - now))
        end
    end
    return false, limit - cur, finish - now, reset
end

local evaluators = {token_bucket, gcra, sliding_log, sliding_counter, fixed_window}

local results = {}
local all_ok = true
for i = 1, #KEYS do
    local base = 3 + 3 * (i - 1)
    local kind = tonumber(ARGV[base])
    local size = tonumber(ARGV[base + 1])
    local interval = tonumber(ARGV[base + 2])
    results[i] = {evaluators[kind](KEYS[i], size, interval)}
    if not results[i][1] then all_ok = false end
end

local consume = all_ok and mode == 1
local reply = {all_ok and 1 or 0, now}
for i = 1, #results do
    local r = results[i]
    local remaining, reset = r[2], r[4]
    if consume then
        remaining, reset = r[5], r[6]
        r[7]()
    end
    local n = #reply
    reply[n + 1] = r[1] and 1 or 0
    reply[n + 2] = remaining
    reply[n + 3] = math.ceil(r[3])
    reply[n + 4] = math.ceil(reset)
end
return reply
