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
def _to_lonlat(crs_text: str) -> Transformer | None:
    """The transformer to longitude/latitude of a CRS (None for EPSG:4326), built once per CRS:
    building one costs as much as the area of a polygon."""
    crs = CRS.from_user_input(crs_text)
    return None if crs.to_epsg() == 4326 else Transformer.from_crs(crs, "EPSG:4326", always_xy=True)


def ring_areas(rings, crs) -> np.ndarray:
    """Area enclosed by each ring on the WGS84 ellipsoid in m2, whatever the CRS (projected areas are
    distorted); one transform of all the coordinates, one geodesic sum per ring. Without a CRS (a pixel
    grid), the planar area in pixels."""
    if crs is None:
        return np.abs(shapely.area(shapely.polygons(rings)))
    coords, ring = shapely.get_coordinates(rings, return_index=True)
    x, y = coords[:, 0], coords[:, 1]
    to_lonlat = _to_lonlat(crs if isinstance(crs, str) else crs.to_wkt())
    if to_lonlat is not None:
        x, y = to_lonlat.transform(x, y)
    bounds = np.searchsorted(ring, np.arange(len(rings) + 1))
    return np.array([abs(_GEOD.polygon_area_perimeter(x[a:b], y[a:b])[0]) for a, b in zip(bounds[:-1], bounds[1:])])


def rings_of(polygons) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every ring of ``polygons``, the index of its polygon, and whether it is that polygon's exterior."""
    rings, owner = shapely.get_rings(polygons, return_index=True)
    return rings, owner, np.diff(owner, prepend=-1) != 0  # each polygon's rings come exterior first


def polygon_areas(polygons, crs) -> np.ndarray:
    """Geodesic area of each polygon in m2: its exterior's less its holes'."""
    rings, owner, exterior = rings_of(polygons)
    areas = ring_areas(rings, crs)
    return np.bincount(owner, weights=np.where(exterior, areas, -areas), minlength=len(polygons))
