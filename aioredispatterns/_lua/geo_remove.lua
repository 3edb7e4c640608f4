-- Remove places of a geo index together with their attributes, atomically.
-- KEYS[1]  the places: a geo set (sorted set), place -> position
-- KEYS[2]  the attributes: a hash, place -> JSON object (same hash slot)
-- ARGV     the places to remove (at least one)
-- returns  how many of them were in the index

-- In slices: unpack() of a long list would overflow Lua's C stack.
local removed = 0
for first = 1, #ARGV, 1000 do
    local last = math.min(first + 999, #ARGV)
    redis.call('HDEL', KEYS[2], unpack(ARGV, first, last))
    removed = removed + redis.call('ZREM', KEYS[1], unpack(ARGV, first, last))
end
return removed
