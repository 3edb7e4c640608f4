-- GEOSEARCH a geo index and read the attributes of what it found, atomically.
-- KEYS[1]  the places: a geo set (sorted set), place -> position
-- KEYS[2]  the attributes: a hash, place -> JSON object (same hash slot)
-- ARGV[1]  '1': also read the attributes; '0': not
-- ARGV[2]  the place the search is centred on ('' when centred on coordinates)
-- ARGV[3..] the arguments of GEOSEARCH after the key (FROM..., BY..., order, COUNT,
--          WITHCOORD WITHDIST)
-- returns  nil when the centre place is not in the index; else {found, attributes}:
--          GEOSEARCH's reply (each {place, distance, {longitude, latitude}}, numbers as
--          strings) and, when asked, the attributes of each place in the same order
--          (nil where a place has none; an empty list when not asked)

if ARGV[2] ~= '' and not redis.call('ZSCORE', KEYS[1], ARGV[2]) then
    return false
end
local found = redis.call('GEOSEARCH', KEYS[1], unpack(ARGV, 3))
local attributes = {}
if ARGV[1] == '1' then
    -- HMGET in slices: unpack() of a long list would overflow Lua's C stack.
    for first = 1, #found, 1000 do
        local places = {}
        for i = first, math.min(first + 999, #found) do
            places[#places + 1] = found[i][1]
        end
        local values = redis.call('HMGET', KEYS[2], unpack(places))
        for i = 1, #places do
            attributes[#attributes + 1] = values[i]
        end
    end
end
return {found, attributes}
