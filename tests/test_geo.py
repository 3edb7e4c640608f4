"""GeoIndex: city distances against a haversine reference, radius and box searches,
attributes written with their place, coordinate bounds (real servers).

The reference distance is the haversine formula on a sphere of radius 6372797.560856 m,
the radius the server itself uses (``EARTH_RADIUS_M``); computed from the coordinates as
given, while the server works from its 52-bit geohash of them (within about a metre).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import uuid
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aioredispatterns import ConfigurationError, connect
from aioredispatterns._commands import execute
from aioredispatterns._connection import is_cluster
from aioredispatterns.geo import (
    EARTH_RADIUS_M,
    MAX_LATITUDE,
    GeoError,
    GeoIndex,
    GeoMatch,
    GeoPoint,
    InvalidCoordinates,
    UnknownPlace,
)
from aioredispatterns.testing import borrowed_connections

# (longitude, latitude) of city centres, in degrees.
CITIES = {
    "paris": (2.3522, 48.8566),
    "london": (-0.1276, 51.5072),
    "berlin": (13.4050, 52.5200),
    "madrid": (-3.7038, 40.4168),
    "rome": (12.4964, 41.9028),
    "reykjavik": (-21.8277, 64.1283),
    "new-york": (-74.0060, 40.7128),
    "sao-paulo": (-46.6333, -23.5505),
    "cape-town": (18.4241, -33.9249),
    "tokyo": (139.6917, 35.6895),
    "sydney": (151.2093, -33.8688),
    "suva": (178.4419, -18.1416),  # Fiji, west of the antimeridian
    "apia": (-171.7514, -13.8333),  # Samoa, east of it
}
UNITS = {"m": 1.0, "km": 1000.0, "mi": 1609.34, "ft": 0.3048}

# CI budget: the other kinds run with --redis-servers (see tests/conftest.py).
pytestmark = pytest.mark.budget_kinds("valkey-9.1", "redis-6.2", "cluster")


def haversine(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Great-circle distance in metres on the server's sphere."""
    (lon1, lat1), (lon2, lat2) = a, b
    phi1, phi2 = math.radians(lat1), math.radians(lat2)
    dphi, dlam = phi2 - phi1, math.radians(lon2 - lon1)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlam / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(h))


def in_box(center: tuple[float, float], point: tuple[float, float], w: float, h: float) -> bool:
    """The server's box rule: north-south distance <= h/2, east-west distance along the
    point's own parallel <= w/2 (metres)."""
    north_south = haversine((point[0], center[1]), point)
    east_west = haversine((center[0], point[1]), point)
    return north_south <= h / 2 and east_west <= w / 2


def _key(prefix: str, name: str, part: str) -> str:
    return f"{prefix}:geo:{{{name}}}:{part}"


async def _cities(client: Any, prefix: str, name: str = "cities") -> GeoIndex:
    index = GeoIndex(client, name, prefix=prefix)
    for city, (lon, lat) in CITIES.items():
        assert await index.add(city, lon, lat, {"name": city.title()})
    return index


def test_the_reference_agrees_with_published_distances() -> None:
    # Great-circle distances as published (km); a sphere is within 0.5% of the ellipsoid.
    published = {("paris", "london"): 344, ("london", "new-york"): 5570,
                 ("tokyo", "sydney"): 7820, ("suva", "apia"): 1150}  # fmt: skip
    for (a, b), km in published.items():
        assert haversine(CITIES[a], CITIES[b]) / 1000 == pytest.approx(km, rel=0.01)


# ------------------------------------------------------------------ distances


async def test_city_distances_within_half_a_percent_of_haversine(
    redis_client: Any, key_prefix: str
) -> None:
    index = await _cities(redis_client, key_prefix)
    worst = 0.0
    for (a, pa), (b, pb) in itertools.combinations(CITIES.items(), 2):
        reference = haversine(pa, pb)
        for unit, metres in UNITS.items():
            got = await index.distance(a, b, unit=unit)  # type: ignore[arg-type]
            assert got is not None
            error = abs(got * metres - reference) / reference
            assert error < 0.005, (a, b, unit, got, reference)
            worst = max(worst, error)
    # The server computes the same formula on the same sphere: what is left is the
    # geohash's rounding of the positions (about a metre) and the reply's 4 decimals.
    assert worst < 1e-5
    assert await index.distance("paris", "atlantis") is None


async def test_positions_round_trip_within_a_metre(redis_client: Any, key_prefix: str) -> None:
    index = await _cities(redis_client, key_prefix)
    for city, point in CITIES.items():
        stored = await index.position(city)
        assert isinstance(stored, GeoPoint)
        assert haversine(point, stored) < 1.0
    assert await index.position("atlantis") is None
    assert await index.size() == len(CITIES)


# -------------------------------------------------------------------- searches


@pytest.mark.parametrize("radius_km", [100, 500, 1000, 1500, 2500, 10_000])
async def test_radius_search_matches_the_reference(
    redis_client: Any, key_prefix: str, radius_km: int
) -> None:
    index = await _cities(redis_client, key_prefix)
    paris = CITIES["paris"]
    reference = {c: haversine(paris, p) / 1000 for c, p in CITIES.items()}
    # No city sits within 1% of the radius: inclusion is never a rounding question.
    assert all(abs(d - radius_km) > radius_km / 100 for d in reference.values())
    expected = sorted((d, c) for c, d in reference.items() if d <= radius_km)
    found = await index.search_radius(paris, radius_km, unit="km")
    assert [m.place for m in found] == [c for _, c in expected]
    for match in found:
        assert match.distance == pytest.approx(reference[match.place], rel=0.005, abs=0.002)
        assert haversine(CITIES[match.place], (match.longitude, match.latitude)) < 1.0
        assert match.attributes is None
    farthest = await index.search_radius(paris, radius_km, unit="km", order="farthest")
    assert [m.place for m in farthest] == [c for _, c in reversed(expected)]
    nearest_two = await index.search_radius(paris, radius_km, unit="km", count=2)
    assert [m.place for m in nearest_two] == [c for _, c in expected[:2]]


async def test_search_centred_on_a_place(redis_client: Any, key_prefix: str) -> None:
    index = await _cities(redis_client, key_prefix)
    found = await index.search_radius("suva", 1500, unit="km", with_attributes=True)
    # Across the antimeridian: Apia is at longitude -171.75, Suva at +178.44.
    assert [(m.place, m.attributes) for m in found] == [
        ("suva", {"name": "Suva"}),
        ("apia", {"name": "Apia"}),
    ]
    assert found[1].distance == pytest.approx(haversine(CITIES["suva"], CITIES["apia"]) / 1000,
                                              rel=0.005)  # fmt: skip
    with pytest.raises(UnknownPlace):
        await index.search_radius("atlantis", 10, unit="km")
    with pytest.raises(UnknownPlace):
        await index.search_box("atlantis", 10, 10)


@pytest.mark.parametrize(("width_km", "height_km"), [(2000, 1000), (2000, 2000), (600, 2200)])
async def test_box_search_matches_the_servers_rule(
    redis_client: Any, key_prefix: str, width_km: int, height_km: int
) -> None:
    index = await _cities(redis_client, key_prefix)
    paris = CITIES["paris"]
    w, h = width_km * 1000, height_km * 1000
    # Every city is clearly in or out (2% margin on both sides of the box).
    for point in CITIES.values():
        assert in_box(paris, point, w * 1.02, h * 1.02) == in_box(paris, point, w / 1.02, h / 1.02)
    expected = sorted((haversine(paris, p), c) for c, p in CITIES.items() if in_box(paris, p, w, h))
    found = await index.search_box(paris, width_km, height_km, unit="km")
    assert [m.place for m in found] == [c for _, c in expected]


# ------------------------------------------------------------------ attributes


async def test_attributes_live_and_die_with_their_place(redis_client: Any, key_prefix: str) -> None:
    index = GeoIndex(redis_client, "shops", prefix=key_prefix)
    assert await index.add("s1", 2.35, 48.85, {"name": "Rivoli", "phone": "+33 1"})
    assert await index.attributes("s1") == {"name": "Rivoli", "phone": "+33 1"}
    # Moving a place keeps its attributes; a mapping replaces them; {} removes them.
    assert not await index.add("s1", 2.36, 48.86)
    assert await index.attributes("s1") == {"name": "Rivoli", "phone": "+33 1"}
    assert not await index.add("s1", 2.36, 48.86, {"name": "Rivoli 2", "é": "ü"})
    assert await index.attributes("s1") == {"name": "Rivoli 2", "é": "ü"}
    await index.add("s2", 2.37, 48.87, {"name": "Bastille"})
    found = await index.search_radius((2.35, 48.85), 10, unit="km", with_attributes=True)
    assert [(m.place, m.attributes) for m in found] == [
        ("s1", {"name": "Rivoli 2", "é": "ü"}),
        ("s2", {"name": "Bastille"}),
    ]
    assert not await index.add("s2", 2.37, 48.87, {})
    assert await index.attributes("s2") == {}
    assert await index.remove("s1", "s2", "nowhere") == 2
    assert await index.attributes("s1") == {}
    assert await index.size() == 0
    assert not await execute(redis_client, "EXISTS", _key(key_prefix, "shops", "attributes"))


async def test_clear_and_one_hash_tag(redis_client: Any, key_prefix: str) -> None:
    index = await _cities(redis_client, key_prefix, "tagged")
    pattern = f"{key_prefix}:*{{tagged}}*" if is_cluster(redis_client) else f"{key_prefix}:*"
    keys = sorted(k.decode() for k in await execute(redis_client, "KEYS", pattern))
    assert keys == [_key(key_prefix, "tagged", "attributes"), _key(key_prefix, "tagged", "places")]
    await index.clear()
    assert await index.size() == 0
    assert await execute(redis_client, "KEYS", pattern) == []


async def test_cancelled_adds_never_split_a_place_from_its_attributes(
    redis_client: Any, key_prefix: str
) -> None:
    index = GeoIndex(redis_client, "fleet", prefix=key_prefix)
    done = 0

    async def driver(n: int, scope: anyio.CancelScope) -> None:
        nonlocal done
        for step in range(50):
            await index.add(f"d{n}-{step}", n / 10, 45 + step / 100, {"n": str(n)})
            done += 1
            if done == 150:  # the other drivers are mid-call: cancel them there
                scope.cancel()

    async with anyio.create_task_group() as tg:
        for n in range(16):
            tg.start_soon(driver, n, tg.cancel_scope)
    places = {
        k.decode()
        for k in await execute(redis_client, "ZRANGE", _key(key_prefix, "fleet", "places"), 0, -1)
    }
    described = {
        k.decode()
        for k in await execute(redis_client, "HKEYS", _key(key_prefix, "fleet", "attributes"))
    }
    assert 150 <= len(places) < 800
    assert places == described
    assert borrowed_connections(redis_client) == []


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("longitude", "latitude"),
    [
        (180.0001, 0),
        (-180.0001, 0),
        (0, 85.0512),
        (0, -85.0512),
        (0, 90),
        (math.nan, 0),
        (0, math.inf),
        (True, 0),
        ("2.35", 48.85),
        (None, 0),
    ],
)
async def test_coordinates_out_of_bounds_are_refused_before_any_command(
    redis_client: Any, key_prefix: str, longitude: Any, latitude: Any
) -> None:
    index = GeoIndex(redis_client, "bad", prefix=key_prefix)
    with pytest.raises(InvalidCoordinates) as caught:
        await index.add("p", longitude, latitude, {"a": "b"})
    assert isinstance(caught.value, ConfigurationError)
    assert isinstance(caught.value, GeoError)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(InvalidCoordinates):
        await index.add("p", longitude, latitude)
    with pytest.raises(InvalidCoordinates):
        await index.search_radius((longitude, latitude), 10)
    with pytest.raises(InvalidCoordinates):
        await index.search_box((longitude, latitude), 10, 10)
    assert await index.size() == 0
    assert not await execute(redis_client, "EXISTS", _key(key_prefix, "bad", "attributes"))


async def test_the_bounds_themselves_are_accepted(redis_client: Any, key_prefix: str) -> None:
    index = GeoIndex(redis_client, "edges", prefix=key_prefix)
    corners = [(180, MAX_LATITUDE), (-180, -MAX_LATITUDE), (180.0, -MAX_LATITUDE), (-180, 0)]
    for n, (lon, lat) in enumerate(corners):
        assert await index.add(f"c{n}", lon, lat)
    assert await index.size() == 4
    found = await index.search_radius((179.9, 0), 100, unit="km")
    assert [m.place for m in found] == ["c3"]  # -180 and +180 are the same meridian


async def test_places_on_the_grids_top_edge_are_found(redis_client: Any, key_prefix: str) -> None:
    """The servers' geohash puts longitude +180 and latitude +85.05112878 one cell past
    the grid, where a search from anywhere else never finds them (and a search from
    +180 never looks west of the antimeridian): the index sends them just inside."""
    index = GeoIndex(redis_client, "edge", prefix=key_prefix)
    places = {
        "east": (180.0, 0.0),
        "almost-east": (179.99999999999997, 10.0),
        "west": (-180.0, 0.0),
        "north": (10.0, MAX_LATITUDE),
        "corner": (180.0, MAX_LATITUDE),
    }
    for place, (lon, lat) in places.items():
        await index.add(place, lon, lat)
    near = {
        "east": [(-179.99999, 0.0), (179.99999, 0.0), (180.0, 0.0)],
        "almost-east": [(-179.99999, 10.0), (179.99999, 10.0)],
        "west": [(180.0, 0.0), (179.99999, 0.0)],
        "north": [(10.00001, MAX_LATITUDE - 1e-6), (9.99999, MAX_LATITUDE)],
        "corner": [(-179.9999, MAX_LATITUDE - 1e-6), (179.9999, MAX_LATITUDE)],
    }
    for place, centres in near.items():
        for centre in centres:
            assert haversine(centre, places[place]) < 30
            found = await index.search_radius(centre, 50)
            assert place in {m.place for m in found}, (place, centre)
    position = await index.position("east")
    assert position is not None
    assert haversine(position, (180.0, 0.0)) < 1.0


@pytest.mark.parametrize(
    "call",
    [
        lambda g: g.add("", 0, 0),
        lambda g: g.add(b"p", 0, 0),
        lambda g: g.add("p", 0, 0, {"a": 1}),
        lambda g: g.add("p", 0, 0, [("a", "b")]),
        lambda g: g.add("p", 0, 0, {"big": "x" * 70_000}),
        lambda g: g.search_radius((0, 0), -1),
        lambda g: g.search_radius((0, 0), math.inf),
        lambda g: g.search_radius((0, 0), 10, unit="yd"),
        lambda g: g.search_radius((0, 0), 10, count=0),
        lambda g: g.search_radius((0, 0), 10, order="random"),
        lambda g: g.search_radius((0, 0), 10, with_attributes=1),
        lambda g: g.search_radius((0, 0, 0), 10),
        lambda g: g.search_radius(b"p", 10),
        lambda g: g.search_box((0, 0), 10, -1),
        lambda g: g.distance("a", "b", unit="parsec"),
    ],
)
async def test_bad_input_is_refused_before_any_command(
    redis_client: Any, key_prefix: str, call: Any
) -> None:
    index = GeoIndex(redis_client, "bad", prefix=key_prefix)
    with pytest.raises(ConfigurationError):
        await call(index)
    assert await index.size() == 0


async def test_works_on_resp3_with_decoded_replies(redis_url: str, key_prefix: str) -> None:
    async with connect(redis_url, protocol=3, decode_responses=True) as client:
        index = await _cities(client, key_prefix, "resp3")
        found = await index.search_radius("paris", 500, unit="km", with_attributes=True)
        assert [(m.place, m.attributes) for m in found] == [
            ("paris", {"name": "Paris"}),
            ("london", {"name": "London"}),
        ]
        assert isinstance(found[1], GeoMatch)
        assert await index.position("paris") is not None
        assert await index.distance("paris", "london", unit="km") == pytest.approx(
            haversine(CITIES["paris"], CITIES["london"]) / 1000, rel=1e-5
        )
        await index.clear()


# ------------------------------------------------------------------ property


def test_radius_search_against_haversine_everywhere(redis_url: str) -> None:
    """Random clusters of places anywhere on the map (poles' edges and the antimeridian
    included): a radius search returns every place the reference puts clearly inside,
    none clearly outside, nearest first, with the reference's distances."""
    loop = asyncio.new_event_loop()
    client = connect(redis_url)
    offsets = st.tuples(st.floats(-3, 3), st.floats(-3, 3))

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        center=st.tuples(st.floats(-180, 180), st.floats(-MAX_LATITUDE, MAX_LATITUDE)),
        spread=st.lists(offsets, min_size=1, max_size=30),
        radius=st.floats(1, 400_000),
    )
    def check(
        center: tuple[float, float], spread: list[tuple[float, float]], radius: float
    ) -> None:
        points = {}
        for n, (dlon, dlat) in enumerate(spread):
            lon = (center[0] + dlon + 180) % 360 - 180
            lat = max(-MAX_LATITUDE, min(MAX_LATITUDE, center[1] + dlat))
            points[f"p{n}"] = (lon, lat)
        index = GeoIndex(client, uuid.uuid4().hex)

        async def run() -> list[GeoMatch]:
            for place, (lon, lat) in points.items():
                await index.add(place, lon, lat)
            try:
                return await index.search_radius(center, radius)
            finally:
                await index.clear()

        found = loop.run_until_complete(run())
        # The server measures from its geohash of each point (within a metre).
        slack = 2.0
        reference = {place: haversine(center, point) for place, point in points.items()}
        got = {m.place for m in found}
        for place, distance in reference.items():
            if distance <= radius - slack:
                assert place in got, (place, distance, radius)
            if distance > radius + slack:
                assert place not in got, (place, distance, radius)
        for match in found:
            assert match.distance == pytest.approx(reference[match.place], rel=0.005, abs=slack)
        assert [m.distance for m in found] == sorted(m.distance for m in found)

    try:
        check()
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
