-- Decide one rate-limit request against one or more limits of one identity, atomically,
-- on the server's clock (TIME). Either every limit consumes `cost` or none does.
-- KEYS[i]      the state key of limit i (all keys share the identity's hash tag)
-- ARGV[1]      mode: 1 = hit (consume if every limit allows), 0 = peek (never writes)
-- ARGV[2]      cost: units to consume (a positive integer, at most every limit's size)
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
--   kind 3      a sorted set: one member per admitted hit (not per unit), scored by its
--               time in us and named "<end>:<cost>", where end is a running total of
--               the units admitted (modulo WRAP). The units in the window are then
--               newest.end - (oldest.end - oldest.cost), two lookups whatever the cost,
--               and the wait for a denied request is a binary search over ranks (the
--               totals grow with the rank). Scores strictly increase (max(now, newest
--               + 1)), so rank order is admission order even if the clock steps back
--               or two hits share a microsecond; a hit scored late only stays in the
--               window longer (never lets more through).
--   kind 4      a string "window current previous": counts of this and the last window.
--   kind 5      a string "window count".
-- Numbers: Lua numbers are doubles, exact for integers up to 2**53 (9.007e15). The
-- client bounds every size (and so every cost) to 1e12 and every span (a window, a
-- period, size * interval for kinds 1 and 2) to ten years, 3.2e14 us: server time
-- (1.7e15 us today) plus two spans stays below 2**53, counts plus a cost below 2e12,
-- running totals below WRAP. Numbers written go through string.format: Lua's own
-- conversion keeps 14 digits, too few for a time in microseconds.

local hit = ARGV[1] == '1'
local cost = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]

-- The running total of a sliding log wraps here: far above any count in one window
-- (<= 1e12), far below 2**53.
local WRAP = 1e15

local function ms(us)
    local v = math.ceil(us / 1000)
    if v < 1 then v = 1 end
    return v
end

-- A sliding log member "<end>:<cost>" as two numbers.
local function entry(member)
    local e, c = string.match(member, '^(%d+):(%d+)$')
    return tonumber(e), tonumber(c)
end

-- Units from a log's oldest in-window hit (which began at total `first`) through the
-- hit that ended at total `last`.
local function units(last, first)
    local d = last - first
    if d < 0 then d = d + WRAP end
    return d
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
        -- Members scored at or below now - interval have left the window.
        local gone = string.format('%.0f', now - interval)
        local first = 0  -- rank of the oldest member still in the window
        if hit then
            redis.call('ZREMRANGEBYSCORE', key, '-inf', gone)
        else
            first = redis.call('ZCOUNT', key, '-inf', gone)
        end
        local count, last, start, newest = 0, 0, 0, nil
        local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
        if top[1] then
            last = entry(top[1])
            newest = tonumber(top[2])
            local bottom = redis.call('ZRANGE', key, first, first)
            if bottom[1] then
                local e, k = entry(bottom[1])
                start = e - k
                count = units(last, start)
            end
        end
        a[i], b[i], c[i] = count, {first, last, start}, newest
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
        local count, newest = a[i], c[i]
        local first, last, start = b[i][1], b[i][2], b[i][3]
        if consume then
            local score = now
            if newest and newest >= now then score = newest + 1 end
            local e = last + cost
            if e >= WRAP then e = e - WRAP end
            redis.call('ZADD', key, string.format('%.0f', score),
                string.format('%.0f:%.0f', e, cost))
            remaining, reset = size - count - cost, score + interval - now
            redis.call('PEXPIRE', key, ms(reset))
        else
            remaining = size - count
            if newest then reset = math.max(0, newest + interval - now) end
            if not ok[i] then
                -- The request passes once the oldest hits holding at least `need` units
                -- have left the window: find the first hit whose total since the
                -- window's start reaches `need` (the newest always does: cost <= size).
                local need = count + cost - size
                local lo, hi = first, redis.call('ZCARD', key) - 1
                while lo < hi do
                    local mid = math.floor((lo + hi) / 2)
                    local e = entry(redis.call('ZRANGE', key, mid, mid)[1])
                    if units(e, start) >= need then hi = mid else lo = mid + 1 end
                end
                retry = tonumber(redis.call('ZRANGE', key, lo, lo, 'WITHSCORES')[2])
                    + interval - now
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
