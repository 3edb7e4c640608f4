-- Fill a cache entry unless it changed since the load began; release the lease and wake waiters.
-- KEYS[1]  the entry
-- KEYS[2]  the entry's lease (fleet-wide single flight)
-- KEYS[3]  the entry's wake-up list (waiters of other processes block on it)
-- ARGV[1]  the version the loader saw (bytes 2..9 of the entry), '' if the entry was absent
-- ARGV[2]  the new entry ('' to write nothing: release and wake only)
-- ARGV[3]  the entry's time to live in ms ('0': no expiry)
-- ARGV[4]  the lease token this caller holds ('' if none)
-- ARGV[5]  how long the wake-up list lives, in ms
-- returns  1 if the entry was written, 0 if it was left alone
--
-- The version check is what makes a fill race-safe: an invalidate() or set() that ran
-- while the loader was busy left a tombstone or a value with another version, so a stale
-- load never overwrites it. An absent entry is always fillable: tombstones outlive the
-- longest load the client lets fill (max_load_time).
local written = 0
if ARGV[2] ~= '' then
    local current = redis.call('GET', KEYS[1])
    if (not current) or string.sub(current, 2, 9) == ARGV[1] then
        if ARGV[3] ~= '0' then
            redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
        else
            redis.call('SET', KEYS[1], ARGV[2])
        end
        written = 1
    end
end
if ARGV[4] ~= '' then
    if redis.call('GET', KEYS[2]) == ARGV[4] then
        redis.call('DEL', KEYS[2])
    end
    redis.call('DEL', KEYS[3])
    redis.call('RPUSH', KEYS[3], '1')
    redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
return written
