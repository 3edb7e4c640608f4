-- Fleet-wide single flight: return the entry if it is there, else take the load lease.
-- KEYS[1]  the entry
-- KEYS[2]  the entry's lease
-- KEYS[3]  the entry's wake-up list
-- ARGV[1]  this caller's lease token
-- ARGV[2]  the lease's time to live in ms
-- returns  {1, entry} when a value or negative entry is there (use it);
--          {2, entry or ''} when this caller now holds the lease (load, then fill);
--          {3, lease ms left} when another caller holds it (wait on the wake-up list)
--
-- Byte 1 of an entry is its kind; 0xA2 marks a tombstone (an invalidated entry), which
-- counts as absent. The wake-up list is cleared with every new lease, so a waiter of
-- this round is not woken by the previous round's signal.
local current = redis.call('GET', KEYS[1])
if current and string.byte(current, 1) ~= 0xA2 then
    return {1, current}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
    redis.call('DEL', KEYS[3])
    return {2, current or ''}
end
return {3, redis.call('PTTL', KEYS[2])}
