"""Lengths and areas in metres whatever the CRS: geodesic areas on the WGS84 ellipsoid, and metres as map
units (a pixel grid's lengths and areas are in pixels)."""
from __future__ import annotations

import functools

import numpy as np
import shapely
from pyproj import CRS, Geod, Transformer

# Metres in a degree of latitude (within 0.5 % anywhere); of longitude, times the latitude's cosine.
METRES_PER_DEGREE = 111_320.0
_GEOD = Geod(ellps="WGS84")


def metres_per_unit(crs) -> float:
    """Metres in one unit of ``crs``: its linear unit's, or a degree of latitude's in a geographic CRS."""
    crs = CRS.from_user_input(crs)
    return METRES_PER_DEGREE if crs.is_geographic else crs.axis_info[0].unit_conversion_factor


def map_units(metres: float, crs) -> float:
    """A length in metres as units of ``crs`` (None: a pixel grid, whose lengths are pixels, kept as given).
    In a geographic CRS, degrees of latitude: a simplification then strays at most ``metres`` from the
    outline in every direction (less east-west, where degrees are shorter)."""
    return metres if crs is None or metres == 0 else metres / metres_per_unit(crs)


@functools.lru_cache(maxsize=16)
def _to_lonlat(crs_text: str) -> Transformer | float | None:
    """The transformer to longitude/latitude of a CRS (None for EPSG:4326), built once per CRS: building one costs
    as much as the area of a polygon. For a local (engineering) CRS, tied to no place on Earth, its metres per
    unit: areas are planar there."""
    crs = CRS.from_user_input(crs_text)
    if crs.is_engineering:
        return metres_per_unit(crs)
    return None if crs.to_epsg() == 4326 else Transformer.from_crs(crs, "EPSG:4326", always_xy=True)


def ring_areas(rings, crs) -> np.ndarray:
    """Area enclosed by each ring on the WGS84 ellipsoid in m2, whatever the CRS (projected areas are
    distorted); one transform of all the coordinates, one geodesic sum per ring. Without a CRS (a pixel
    grid), the planar area in pixels; in a local CRS, the planar area in m2."""
    if crs is None:
        return np.abs(shapely.area(shapely.polygons(rings)))
    to_lonlat = _to_lonlat(crs if isinstance(crs, str) else crs.to_wkt())
    if isinstance(to_lonlat, float):  # a local CRS: planar, in its unit
        return np.abs(shapely.area(shapely.polygons(rings))) * to_lonlat ** 2
    coords, ring = shapely.get_coordinates(rings, return_index=True)
    x, y = coords[:, 0], coords[:, 1]
    if to_lonlat is not None:
        x, y = to_lonlat.transform(x, y)
    bounds = np.searchsorted(ring, np.arange(len(rings) + 1))
    return np.array([abs(_GEOD.polygon_area_perimeter(x[a:b], y[a:b])[0]) for a, b in zip(bounds[:-1], bounds[1:])])


# Rings bounded by a pixel's area instead of measured one by one (``rings_below``): only where a pixel's area,
# sampled at 3 x 3 points over their extent, varies by at most SPREAD (a raster's projection and latitude vary
# smoothly; a continent-wide raster's do not), and then within MARGIN of those samples either way.
PIXEL_AREA_SPREAD, PIXEL_AREA_MARGIN = 0.01, 0.05
BOUNDED_FROM = 32  # fewer rings are measured: it costs less than sampling a pixel's area


def rings_below(rings, limit: float, to_map, crs) -> np.ndarray:
    """Whether each ring, in pixel coordinates, encloses less than ``limit`` m2 once mapped by ``to_map``
    (``ring_areas``). Rings far from the limit, such as a noisy mask's specks, are decided by their area in
    pixels times bounds on a pixel's; only those near it are measured (pyproj's geodesic sum: 10 us a ring,
    0.2 s for the holes of a random M2CD's mask at 4096², 0.016 s bounded, with the same outcome). The two
    can differ only where ``ring_areas`` strays from the pixels' area by over ``PIXEL_AREA_MARGIN``: a long,
    thin hole in degrees, whose straight edges it measures as geodesics."""
    def measured(some) -> np.ndarray:
        return ring_areas(shapely.transform(some, to_map), crs) < limit

    bounds = None if crs is None or len(rings) < BOUNDED_FROM else pixel_area_bounds(rings, to_map, crs)
    if bounds is None:
        return measured(rings)
    pixels = np.abs(shapely.area(shapely.polygons(rings)))
    below = pixels * bounds[1] < limit
    unsure = ~below & (pixels * bounds[0] < limit)
    if unsure.any():
        below[unsure] = measured(rings[unsure])
    return below


def pixel_area_bounds(rings, to_map, crs) -> tuple[float, float] | None:
    """(least, most) m2 a pixel covers within the extent of ``rings`` (pixel coordinates), or None where its
    area varies too much over it to be bounded from samples (``PIXEL_AREA_SPREAD``)."""
    min_x, min_y, max_x, max_y = shapely.total_bounds(rings)
    # Pixels' top-left corners within the rings' extent: no pixel beyond the raster.
    x, y = np.meshgrid(np.linspace(min_x, max_x - 1, 3), np.linspace(min_y, max_y - 1, 3))
    corners = np.stack([x.ravel(), y.ravel()], axis=1)[:, None] + np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]])
    areas = ring_areas(shapely.linearrings(to_map(corners.reshape(-1, 2)).reshape(-1, 5, 2)), crs)
    least, most = areas.min(), areas.max()
    if not most <= least * (1 + PIXEL_AREA_SPREAD):
        return None
    return least * (1 - PIXEL_AREA_MARGIN), most * (1 + PIXEL_AREA_MARGIN)


def rings_of(polygons) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ring of ``polygons``, the index of its polygon, and whether it is that polygon's exterior."""
    rings, owner = shapely.get_rings(polygons, return_index=True)
    return rings, owner, np.diff(owner, prepend=-1) != 0  # each polygon's rings come exterior first


def polygon_areas(polygons, crs) -> np.ndarray:
    """Geodesic area of each polygon in m2: its exterior's less its holes'."""
    rings, owner, exterior = rings_of(polygons)
    areas = ring_areas(rings, crs)
    return np.bincount(owner, weights=np.where(exterior, areas, -areas), minlength=len(polygons))
