"""Geo indexes: places with a position and attributes, searched by radius or by box.

A :class:`GeoIndex` keeps its places in one geo set (``GEOADD``: a sorted set scored by a
52-bit geohash, so a position is kept to within about a metre) and their attributes (a
store's address, a driver's status) in one hash beside it, under the same hash tag. A place
and its attributes are written and removed together in one Lua script, and a search reads
the attributes of what it found in the same script, so nobody ever sees a place without the
attributes it was added with.

Searches are ``GEOSEARCH`` (Redis 6.2+, every Valkey): by radius or by box, centred on
coordinates or on a place of the index, nearest (or farthest) first, optionally cut to the
``count`` nearest, each match with its distance and its stored coordinates.

Coordinates are ``(longitude, latitude)`` in degrees, in that order (as ``GEOADD`` takes
them). The server accepts longitudes in [-180, 180] and latitudes in [-85.05112878,
85.05112878] (the Web Mercator square; the poles' caps are out of reach); anything else,
or a value that is not a finite number, raises :class:`InvalidCoordinates` before any
command is sent.

The servers' search has one blind spot, which this class steps around: a coordinate that
their geohash rounds onto the grid's top edge (a longitude of +180, or within about 3e-14
degrees of it; a latitude of +85.05112878, or within about 2e-14 degrees of it) is stored
one cell outside the grid, where no search centred elsewhere ever finds it, and a search
centred at +180 misses everything west of the antimeridian. Such a longitude is sent as
-180 (the same meridian: :meth:`GeoIndex.position` then reads about -180), such a latitude
a few 1e-14 degrees lower, both for places and for search centres.

Distances are computed by the server with the haversine formula on a sphere of radius
6372797.560856 m (so they may differ from an ellipsoidal (WGS84) distance by up to about
0.5%), and returned with four decimals in the unit asked for.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Final, Literal, NamedTuple, TypeAlias

from ._commands import Arg, execute
from ._connection import AnyRedis, check_client
from ._keys import DEFAULT_PREFIX, keyspace
from ._scripts import Script
from ._validate import check_choice, check_count, check_flag, check_name, check_number, shown
from .errors import ConfigurationError, RedisPatternsError, SerializationError

__all__ = (
    "EARTH_RADIUS_M",
    "GeoError",
    "GeoIndex",
    "GeoMatch",
    "GeoOrder",
    "GeoPoint",
    "GeoUnit",
    "InvalidCoordinates",
    "MAX_LATITUDE",
    "MAX_LONGITUDE",
    "UnknownPlace",
)

_ADD = Script.load("geo_add")
_REMOVE = Script.load("geo_remove")
_SEARCH = Script.load("geo_search")

#: The largest longitude the server accepts, in degrees (and -180 the smallest).
MAX_LONGITUDE: Final = 180.0
#: The largest latitude the server accepts, in degrees (and its negative the smallest).
MAX_LATITUDE: Final = 85.05112878
#: The radius of the sphere the server measures distances on, in metres.
EARTH_RADIUS_M: Final = 6372797.560856

#: A distance unit: metres, kilometres, miles or feet.
GeoUnit: TypeAlias = Literal["m", "km", "mi", "ft"]
#: The order of search results.
GeoOrder: TypeAlias = Literal["nearest", "farthest"]

_UNITS = ("m", "km", "mi", "ft")
_ORDERS = {"nearest": "ASC", "farthest": "DESC"}
# The most a place's attributes may take once encoded (JSON): they live in one hash field.
_MAX_ATTRIBUTES_BYTES: Final = 64 * 1024


class GeoError(RedisPatternsError):
    """Base of the geo index's errors."""


class InvalidCoordinates(GeoError, ConfigurationError):
    """A longitude or latitude that is not a finite number within the server's bounds
    (longitude in [-180, 180], latitude in [-85.05112878, 85.05112878]).

    Raised before any command is sent.
    """


class UnknownPlace(GeoError, LookupError):
    """A search was centred on a place that is not in the index."""


class GeoPoint(NamedTuple):
    """A position in degrees: ``(longitude, latitude)``, in that order."""

    longitude: float
    latitude: float


class GeoMatch(NamedTuple):
    """One place found by a search.

    Attributes:
        place: the place's name.
        distance: from the search's centre, in the search's unit.
        longitude: the place's stored longitude (the geohash's cell centre).
        latitude: the place's stored latitude.
        attributes: its attributes (``{}`` if it has none) when the search asked for
            them, else None.
    """

    place: str
    distance: float
    longitude: float
    latitude: float
    attributes: dict[str, str] | None = None


def _coordinate(name: str, value: object, bound: float) -> float:
    try:
        return float(check_number(name, value, minimum=-bound, maximum=bound))
    except ConfigurationError as exc:
        raise InvalidCoordinates(str(exc)) from None


def _on_the_top_edge(value: float, bound: float) -> bool:
    """Whether the server's geohash puts ``value`` on the top edge of its grid.

    The server encodes a coordinate as ``(value + bound) / (2 * bound)`` times 2**26 cells
    (the same double arithmetic as here); an offset of 1.0 is one cell past the grid.
    A place stored there is never found by a search centred anywhere else, and a search
    centred at longitude +180 does not look west of the antimeridian (Redis 6.2 and 7,
    Valkey 8 and 9 alike).
    """
    return (value + bound) / (bound + bound) >= 1.0


def _point(longitude: object, latitude: object) -> tuple[str, str]:
    lon = _coordinate("longitude", longitude, MAX_LONGITUDE)
    lat = _coordinate("latitude", latitude, MAX_LATITUDE)
    if _on_the_top_edge(lon, MAX_LONGITUDE):
        lon = -MAX_LONGITUDE  # the same meridian, on the grid's other (working) edge
    while _on_the_top_edge(lat, MAX_LATITUDE):
        lat = math.nextafter(lat, 0.0)  # a few 1e-14 degrees south: back inside the grid
    # repr() of a float parses back (strtod, on the server) to the same double.
    return repr(lon), repr(lat)


def _place(value: object, what: str = "place") -> str:
    if not isinstance(value, str):
        raise ConfigurationError(f"{what} must be a str, got {shown(value)}")
    check_name(what, value)
    return value


def _encode_attributes(attributes: object) -> str:
    if not isinstance(attributes, Mapping):
        raise ConfigurationError(
            f"attributes must be a mapping of str to str, got {type(attributes).__name__}"
        )
    for key, value in attributes.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ConfigurationError(
                f"attributes must map str to str, got {shown(key)}: {shown(value)}"
            )
    encoded = json.dumps(dict(attributes), sort_keys=True, separators=(",", ":"))
    if len(encoded) > _MAX_ATTRIBUTES_BYTES:  # ASCII: one byte per character
        raise ConfigurationError(
            f"attributes take {len(encoded)} bytes, above the limit of {_MAX_ATTRIBUTES_BYTES}"
        )
    return encoded


def _decode_attributes(raw: object) -> dict[str, str]:
    if raw is None:
        return {}
    try:
        value = json.loads(raw if isinstance(raw, str | bytes) else str(raw))
    except ValueError as exc:
        raise SerializationError(f"attributes are not JSON: {shown(raw)}") from exc
    if not isinstance(value, dict):
        raise SerializationError(f"attributes are not a JSON object: {shown(raw)}")
    return {str(k): str(v) for k, v in value.items()}


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class GeoIndex:
    """Places with a position and attributes, searched by radius or by box.

    Args:
        client: a ``redis.asyncio`` client (see :func:`aioredispatterns.connect`).
        name: the index's name; two indexes with the same name and prefix are one.
        prefix: the key namespace.

    Keys: ``<prefix>:geo:{<name>}:places`` (a geo set) and ``...:attributes`` (a hash,
    place -> JSON object of str -> str). Neither has a TTL: :meth:`clear` deletes both.

    Cancellation: every write is one command or one Lua script, so a cancelled caller
    leaves a place either fully written (position and attributes) or untouched. Reads
    write nothing. Nothing runs in the background.

    Raises:
        InvalidKeyError: ``name`` is empty, neither str nor bytes, or too long.
        ConfigurationError: ``prefix`` is invalid.
    """

    def __init__(self, client: AnyRedis, name: str, *, prefix: str = DEFAULT_PREFIX) -> None:
        self._client = check_client(client)
        self.name: Final[str] = name
        space = keyspace(prefix, "geo", name)
        self._places = space.key("places")
        self._attributes = space.key("attributes")

    def __repr__(self) -> str:
        return f"<GeoIndex {self.name!r}>"

    async def add(
        self,
        place: str,
        longitude: float,
        latitude: float,
        attributes: Mapping[str, str] | None = None,
    ) -> bool:
        """Add ``place`` at ``(longitude, latitude)``, or move it there.

        Args:
            attributes: replace the place's attributes with these (an empty mapping
                removes them); None leaves them as they are (moving a place keeps them).

        Returns:
            True if the place is new to the index.

        Raises:
            InvalidCoordinates: a coordinate is out of bounds or not a finite number.
            ConfigurationError: ``place`` is not a non-empty str, or ``attributes`` is not
                a mapping of str to str (at most 64 KiB once encoded).
            ConnectionFailed, CommandTimeout: the server did not answer (the write may
                or may not have happened).

        Cancellation: one command (without attributes) or one script: the position and
        the attributes are written together or not at all.
        """
        checked = _place(place)
        lon, lat = _point(longitude, latitude)
        if attributes is None:
            return bool(await execute(self._client, "GEOADD", self._places, lon, lat, checked))
        encoded = _encode_attributes(attributes) if attributes else ""
        added = await _ADD.run(
            self._client, [self._places, self._attributes], [lon, lat, checked, encoded]
        )
        return bool(added)

    async def remove(self, *places: str) -> int:
        """Remove places and their attributes; return how many were in the index.

        Cancellation: one script: all removed or none.
        """
        checked = [_place(place) for place in places]
        if not checked:
            return 0
        return int(await _REMOVE.run(self._client, [self._places, self._attributes], checked))

    async def clear(self) -> None:
        """Delete the whole index (places and attributes, one command)."""
        await execute(self._client, "DEL", self._places, self._attributes)

    async def size(self) -> int:
        """How many places the index holds."""
        return int(await execute(self._client, "ZCARD", self._places))

    async def position(self, place: str) -> GeoPoint | None:
        """Where ``place`` is stored (the centre of its geohash cell, within a metre of
        where it was added), or None if it is not in the index."""
        reply = await execute(self._client, "GEOPOS", self._places, _place(place))
        found = reply[0] if reply else None
        if found is None:
            return None
        return GeoPoint(float(found[0]), float(found[1]))

    async def attributes(self, place: str) -> dict[str, str]:
        """``place``'s attributes (``{}`` if it has none or is not in the index).

        Raises:
            SerializationError: the stored attributes are not a JSON object (written by
                something other than this class).
        """
        raw = await execute(self._client, "HGET", self._attributes, _place(place))
        return _decode_attributes(raw)

    async def distance(self, first: str, second: str, *, unit: GeoUnit = "m") -> float | None:
        """The distance between two places of the index (None if either is missing).

        Raises:
            ConfigurationError: a place is invalid or ``unit`` is unknown.
        """
        check_choice("unit", unit, _UNITS)
        reply = await execute(
            self._client, "GEODIST", self._places, _place(first), _place(second), unit
        )
        return None if reply is None else float(reply)

    async def search_radius(
        self,
        center: GeoPoint | tuple[float, float] | str,
        radius: float,
        *,
        unit: GeoUnit = "m",
        count: int | None = None,
        order: GeoOrder = "nearest",
        with_attributes: bool = False,
    ) -> list[GeoMatch]:
        """The places within ``radius`` of ``center``, nearest first.

        Args:
            center: ``(longitude, latitude)``, or the name of a place of the index.
            radius: in ``unit`` (>= 0).
            count: return only the ``count`` nearest (or farthest) matches.
            order: ``"nearest"`` or ``"farthest"`` first.
            with_attributes: also read each match's attributes (in the same script).

        Raises:
            InvalidCoordinates: ``center``'s coordinates are out of bounds.
            UnknownPlace: ``center`` names a place that is not in the index.
            ConfigurationError: another argument is out of range (before any command).
        """
        size = check_number("radius", radius, minimum=0)
        return await self._search(
            center, ["BYRADIUS", repr(float(size))], unit, count, order, with_attributes
        )

    async def search_box(
        self,
        center: GeoPoint | tuple[float, float] | str,
        width: float,
        height: float,
        *,
        unit: GeoUnit = "m",
        count: int | None = None,
        order: GeoOrder = "nearest",
        with_attributes: bool = False,
    ) -> list[GeoMatch]:
        """The places within a ``width`` x ``height`` box centred on ``center``, nearest
        first.

        The box's sides run east-west (``width``) and north-south (``height``), in
        ``unit``, as the server measures them: a place is in it when its north-south
        distance from the centre is at most ``height / 2`` and its east-west distance,
        along its own parallel, at most ``width / 2``.

        Args:
            center, unit, count, order, with_attributes: as :meth:`search_radius`.

        Raises:
            InvalidCoordinates, UnknownPlace, ConfigurationError: as :meth:`search_radius`.
        """
        box_width = check_number("width", width, minimum=0)
        box_height = check_number("height", height, minimum=0)
        by = ["BYBOX", repr(float(box_width)), repr(float(box_height))]
        return await self._search(center, by, unit, count, order, with_attributes)

    async def _search(
        self,
        center: object,
        by: Sequence[Arg],
        unit: object,
        count: object,
        order: object,
        with_attributes: object,
    ) -> list[GeoMatch]:
        check_choice("unit", unit, _UNITS)
        direction = _ORDERS[str(check_choice("order", order, tuple(_ORDERS)))]
        attributes = check_flag("with_attributes", with_attributes)
        origin: list[Arg]
        if isinstance(center, str):
            member = _place(center, "center")
            origin = ["FROMMEMBER", member]
        elif isinstance(center, Sequence) and not isinstance(center, bytes) and len(center) == 2:
            member = ""
            origin = ["FROMLONLAT", *_point(center[0], center[1])]
        else:
            raise ConfigurationError(
                f"center must be a place name or (longitude, latitude), got {shown(center)}"
            )
        args: list[Arg] = ["1" if attributes else "0", member, *origin, *by, str(unit)]
        args.append(direction)
        if count is not None:
            args += ("COUNT", check_count("count", count, minimum=1))
        args += ("WITHCOORD", "WITHDIST")
        reply = await _SEARCH.run(self._client, [self._places, self._attributes], args)
        if reply is None:
            raise UnknownPlace(f"no place {member!r} in geo index {self.name!r}")
        found, raw_attributes = reply
        return [
            GeoMatch(
                _text(item[0]),
                float(item[1]),
                float(item[2][0]),
                float(item[2][1]),
                _decode_attributes(raw_attributes[i]) if attributes else None,
            )
            for i, item in enumerate(found)
        ]
