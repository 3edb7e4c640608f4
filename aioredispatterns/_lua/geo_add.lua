-- Add (or move) a place of a geo index and replace its attributes, atomically.
-- KEYS[1]  the places: a geo set (sorted set), place -> position
-- KEYS[2]  the attributes: a hash, place -> JSON object (same hash slot)
-- ARGV[1]  longitude, ARGV[2] latitude (checked by the client: within the GEOADD bounds)
-- ARGV[3]  the place
-- ARGV[4]  its attributes as a JSON object; '' removes them
-- returns  1 if the place is new, 0 if it was there (and moved)

local added = redis.call('GEOADD', KEYS[1], ARGV[1], ARGV[2], ARGV[3])
if ARGV[4] == '' then
    redis.call('HDEL', KEYS[2], ARGV[3])
else
    redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
end
return added
