-- Decide one rate-limit request against one or more limits of one identity, atomically,
-- on the server's clock (TIME). Either every limit consumes `cost` or none does.
-- KEYS[i]      the state key of limit i (all keys share the identity's hash tag)
-- ARGV[1]      mode: 1 = hit (consume if every limit allows), 0 = peek (never writes)
-- ARGV[2]      cost: units to consume (a positive integer)
-- ARGV[3i .. 3i+2]  limit i: kind, size, interval_us
--              kind 1 token bucket    size = capacity, interval_us = microseconds per token
--              kind 2 GCRA            size = burst,    interval_us = emission interval
--              kind 3 sliding log     size = limit,    interval_us = window
--              kind 4 sliding counter size = limit,    interval_us = window
--              kind 5 fixed window    size = limit,    interval_us = window
-- returns      {allowed (0/1), server time in us, then per limit i:
--               allowed_i, remaining_i, retry_after_us_i, reset_after_us_i}
--
-- State, one key per limit, consumed from only when every limit allows a hit, and given
-- a TTL by the same script whenever it is written (so a key never lives without one;
-- a sliding log also drops the members that have left its window on any hit, which
-- keeps its TTL):
--   kinds 1, 2  a string: the theoretical arrival time (TAT) in us. A token bucket of
--               capacity C refilled every I us is GCRA with burst C and interval I:
--               tokens = C - (TAT - now) / I, so both share this code.
--   kind 3      a sorted set: one member per admitted unit, scored by its time in us.
--   kind 4      a string "window current previous": counts of this and the last window.
--   kind 5      a string "window count".
-- Numbers written go through string.format: Lua's own conversion keeps 14 digits, too
-- few for a time in microseconds.

local hit = ARGV[1] == '1'
local cost = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]

local function ms(us)
    local v = math.ceil(us / 1000)
    if v < 1 then v = 1 end
    return v
end

-- Phase 1: read every limit's state and decide whether it allows `cost` more units.
local n = #KEYS
local ok, a, b, c = {}, {}, {}, {}  -- per limit: allowed, then state by kind
local all = true
for i = 1, n do
    local key = KEYS[i]
    local kind = tonumber(ARGV[3 * i])
    local size = tonumber(ARGV[3 * i + 1])
    local interval = tonumber(ARGV[3 * i + 2])
    local allowed
    if kind <= 2 then
        local tat = tonumber(redis.call('GET', key))
        if tat == nil or tat < now then tat = now end
        a[i] = tat
        allowed = tat + (cost - size) * interval <= now
    elseif kind == 3 then
        local count
        if hit then
            -- Members older than the window no longer count: drop them, then count.
            redis.call('ZREMRANGEBYSCORE', key, '-inf', string.format('%.0f', now - interval))
            count = redis.call('ZCARD', key)
        else
            count = redis.call('ZCOUNT', key, string.format('(%.0f', now - interval), '+inf')
        end
        a[i] = count
        allowed = count + cost <= size
    else
        local idx = math.floor(now / interval)
        local cur, prev = 0, 0
        local v = redis.call('GET', key)
        if v then
            local w, x, y = string.match(v, '^(%d+) (%d+) ?(%d*)$')
            w = tonumber(w)
            if w == idx then
                cur, prev = tonumber(x), tonumber(y) or 0
            elseif w == idx - 1 and kind == 4 then
                prev = tonumber(x)
            end
        end
        a[i], b[i], c[i] = idx, cur, prev
        if kind == 4 then
            local estimate = prev * (1 - (now - idx * interval) / interval) + cur
            allowed = estimate + cost <= size
        else
            allowed = cur + cost <= size
        end
    end
    ok[i] = allowed
    if not allowed then all = false end
end

-- Phase 2: consume from every limit (or none), and report each one.
local consume = all and hit
local reply = {all and 1 or 0, now}
for i = 1, n do
    local key = KEYS[i]
    local kind = tonumber(ARGV[3 * i])
    local size = tonumber(ARGV[3 * i + 1])
    local interval = tonumber(ARGV[3 * i + 2])
    local remaining, retry, reset = 0, 0, 0
    if kind <= 2 then
        local tat = a[i]
        if consume then
            local new_tat = tat + cost * interval
            reset = new_tat - now
            remaining = math.floor((now - new_tat) / interval + size + 1e-9)
            redis.call('SET', key, string.format('%.17g', new_tat), 'PX', ms(reset))
        else
            reset = tat - now
            remaining = math.floor((now - tat) / interval + size + 1e-9)
            if not ok[i] then retry = tat + (cost - size) * interval - now end
        end
    elseif kind == 3 then
        local count = a[i]
        if consume then
            local score = string.format('%.0f', now)
            local args = {}
            for k = 1, cost do
                args[2 * k - 1] = score
                -- Unique within one microsecond: the in-window count only grows there.
                args[2 * k] = score .. ':' .. (count + k)
            end
            redis.call('ZADD', key, unpack(args))
            redis.call('PEXPIRE', key, ms(interval))
            remaining, reset = size - count - cost, interval
        else
            remaining = size - count
            local floor_score = string.format('(%.0f', now - interval)
            local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
            if newest[2] then reset = math.max(0, tonumber(newest[2]) + interval - now) end
            if not ok[i] then
                -- Wait until enough of the oldest units in the window have left it.
                local oldest = redis.call('ZRANGEBYSCORE', key, floor_score, '+inf',
                    'WITHSCORES', 'LIMIT', count + cost - size - 1, 1)
                retry = interval
                if oldest[2] then retry = tonumber(oldest[2]) + interval - now end
            end
        end
    else
        local idx, cur, prev = a[i], b[i], c[i]
        local start = idx * interval
        if kind == 4 then
            local estimate = prev * (1 - (now - start) / interval) + cur
            remaining = math.floor(size - estimate + 1e-9)
            if remaining < 0 then remaining = 0 end
            -- The current window's count weighs until the end of the next one.
            if cur > 0 then reset = start + 2 * interval - now
            elseif prev > 0 then reset = start + interval - now end
            if consume then
                reset = start + 2 * interval - now
                remaining = remaining - cost
                redis.call('SET', key, string.format('%.0f %.0f %.0f', idx, cur + cost, prev),
                    'PX', ms(reset))
            elseif not ok[i] then
                if cur + cost > size then
                    -- Wait for the next window, then for this one's weight to fade enough.
                    local f = 1 - (size - cost) / cur
                    if f < 0 then f = 0 end
                    retry = start + interval + f * interval - now
                else
                    retry = start + (1 - (size - cur - cost) / prev) * interval - now
                end
                -- One microsecond more: the estimate is a float and must be within then.
                retry = retry + 1
            end
        else
            local finish = start + interval
            remaining = size - cur
            if cur > 0 then reset = finish - now end
            if consume then
                remaining, reset = size - cur - cost, finish - now
                redis.call('SET', key, string.format('%.0f %.0f', idx, cur + cost),
                    'PX', ms(reset))
            elseif not ok[i] then
                retry = finish - now
            end
        end
    end
    local m = #reply
    reply[m + 1] = ok[i] and 1 or 0
    reply[m + 2] = remaining
    reply[m + 3] = math.ceil(retry)
    reply[m + 4] = math.ceil(reset)
end
return reply
