"""An area of interest: polygons from a vector file that limit a run to the part of the grid they cover.

The grid is cut to the polygons' bounds (so the windows, and the time, follow the area, not the raster),
and pixels outside the polygons count as invalid: nodata in the outputs, and windows without a pixel
inside are never run.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
import shapely.affinity
from affine import Affine
from pyproj import CRS, Transformer
from pyproj.exceptions import ProjError
from rasterio.features import geometry_mask
from rasterio.windows import Window

from geochange.engine.errors import RasterError
from geochange.engine.grid import Grid, crs_name, is_local, lon_wrap_proj4
from geochange.engine.remote import refuse_remote


def split_layer(source: str) -> tuple[str, str | None]:
    """``FILE`` or QGIS's ``FILE|layername=NAME``: the file and the layer (None: the file's first)."""
    path, _, options = str(source).partition("|")
    layer = next((value for key, _, value in (o.partition("=") for o in options.split("|")) if key == "layername"),
                 None)
    return path, layer


def absolute_layer(source: str, folder: str | os.PathLike) -> str:
    """``source`` (``FILE`` or ``FILE|layername=NAME``) with its file made absolute, read from ``folder``."""
    file = split_layer(source)[0]
    return os.path.abspath(os.path.join(folder, file)) + source[len(file):]


def read_polygons(source: str, role: str = "the area of interest", *,
                  allow_empty: bool = False) -> tuple[object, CRS | None]:
    """The union of the polygons of a vector layer, in its CRS (None where the layer has none); ``role``: what
    the layer is, for the messages. ``allow_empty``: a layer without features is an empty geometry (a map of
    change where nothing changed), not an error."""
    from osgeo import ogr

    path, name = split_layer(source)
    if not Path(path).is_file():
        raise RasterError(f"{path}: no such file ({role})")
    refuse_remote(path)
    dataset = ogr.Open(path)
    layer = None if dataset is None else (dataset.GetLayerByName(name) if name else dataset.GetLayer(0))
    if layer is None and dataset is not None and dataset.GetLayerCount():
        held = ", ".join(dataset.GetLayer(i).GetName() for i in range(dataset.GetLayerCount()))
        raise RasterError(f"{path}: no layer {name!r} ({role}); its layers: {held}")
    if layer is None:
        raise RasterError(f"{source}: not a vector layer GDAL can read ({role})")
    geometries = []
    for feature in layer:
        geometry = feature.GetGeometryRef()
        if geometry is not None:
            geometries.append(shapely.from_wkb(bytes(geometry.ExportToWkb())))
    polygons = [g for g in geometries if g.geom_type in ("Polygon", "MultiPolygon") and not g.is_empty]
    if not polygons and (geometries or not allow_empty):
        raise RasterError(f"{source}: no polygon in {role} ({len(geometries)} other features)")
    srs = layer.GetSpatialRef()
    return shapely.union_all(shapely.make_valid(polygons)), CRS.from_wkt(srs.ExportToWkt()) if srs else None


@dataclass(frozen=True)
class AreaOfInterest:
    """Polygons in the grid's CRS; ``mask(window, grid)``: the window's pixels whose centres lie inside."""

    geometry: object
    source: str

    def mask(self, window: Window, grid: Grid) -> np.ndarray:
        if self.geometry.is_empty:  # rasterio refuses to burn no geometry
            return np.zeros((int(window.height), int(window.width)), bool)
        transform = grid.transform * Affine.translation(window.col_off, window.row_off)
        return geometry_mask([self.geometry], (int(window.height), int(window.width)), transform, invert=True)

    def crop(self, grid: Grid) -> Grid:
        """``grid`` cut to the pixels that the polygons' bounds touch, on the same pixel lattice."""
        left, bottom, right, top = self.geometry.bounds
        inverse = ~grid.transform
        cols, rows = zip(*(inverse * corner for corner in ((left, top), (right, bottom), (left, bottom), (right, top))))
        col0, row0 = max(0, math.floor(min(cols))), max(0, math.floor(min(rows)))
        col1, row1 = min(grid.width, math.ceil(max(cols))), min(grid.height, math.ceil(max(rows)))
        if col1 <= col0 or row1 <= row0:
            raise RasterError(f"{self.source}: the area of interest does not overlap the rasters")
        return Grid(grid.crs, grid.transform * Affine.translation(col0, row0), col1 - col0, row1 - row0)


def area_of_interest(source: str, grid: Grid, role: str = "the area of interest", *,
                     allow_empty: bool = False) -> AreaOfInterest:
    """The polygons of ``source`` in the grid's CRS (taken to be in it where the file names no CRS); ``role``:
    what they are, for the messages (other polygons, e.g. a reference map, are placed on a grid the same way).
    ``allow_empty``: a layer without features covers no pixel."""
    if grid.crs is None:
        raise RasterError(f"{source}: {role} needs georeferenced rasters; these have no CRS")
    geometry, crs = read_polygons(source, role, allow_empty=allow_empty)
    if geometry.is_empty:
        return AreaOfInterest(geometry, str(source))
    grid_crs = CRS.from_user_input(grid.crs)
    try:
        if grid.past_antimeridian:
            geometry = _on_grid_past_antimeridian(geometry, crs, grid)
        elif crs is not None and grid_crs != crs:
            geometry = _near_grid(geometry, crs, grid)
            if not geometry.is_empty:
                geometry = _transformed(geometry, crs, grid_crs)
    except ProjError:
        why = ("a local CRS is tied to no place on Earth" if is_local(crs) or is_local(grid_crs) else
               "PROJ knows no way between them")
        raise RasterError(f"{source}: {role} is in {crs_name(crs)}, which cannot be transformed to the rasters' CRS, "
                          f"{crs_name(grid_crs)} ({why}); give it in the rasters' CRS") from None
    if geometry.is_empty:
        raise RasterError(f"{source}: {role} does not overlap the rasters")
    return AreaOfInterest(geometry, str(source))


def _near_grid(geometry, crs, grid: Grid):
    """``geometry`` (in ``crs``) cut to the grid's surroundings, its bounds in ``crs`` and a twentieth more: a
    continent's outline reaches where the grid's projection is undefined (a UTM zone's far side), whose points it
    maps to infinity. Kept whole where those bounds cannot be had (the grid reaches where ``crs`` is undefined, or
    they cross the antimeridian in degrees)."""
    try:
        bounds = Transformer.from_crs(CRS.from_user_input(grid.crs), crs, always_xy=True).transform_bounds(
            *grid.bounds, densify_pts=21)
    except ProjError:
        return geometry
    left, bottom, right, top = bounds
    if not (all(map(math.isfinite, bounds)) and left < right):
        return geometry
    margin = 0.05 * max(right - left, top - bottom)
    return shapely.intersection(geometry, shapely.box(left - margin, bottom - margin, right + margin, top + margin))


def _on_grid_past_antimeridian(geometry, crs, grid: Grid):
    """Polygons on a geographic grid that reaches past ±180° (``grid.common_grid``), cut to the grid.

    Projected ones, cut to the grid's surroundings first, come into the grid's CRS part by part, with longitudes
    kept in -180°..180° or wrapped around the grid's middle: whichever spans fewer degrees is whole (an outline
    across 180° folds in the first, one across the grid's far side in the second). In degrees, each vertex keeps its
    side of 180° (``_transformed``). Then the polygons a turn east and west too: the other side's lie there."""
    left, bottom, right, top = grid.bounds
    grid_crs = CRS.from_user_input(grid.crs)
    if crs is not None and not crs.is_geographic:
        geometry = _near_grid(geometry, crs, grid)
        wrapped = CRS.from_user_input(lon_wrap_proj4(grid.crs, (left + right) / 2))
        parts = []
        for part in shapely.get_parts(geometry):
            plain, around = (_transformed(part, crs, to) for to in (grid_crs, wrapped))
            parts.append(plain if plain.bounds[2] - plain.bounds[0] <= around.bounds[2] - around.bounds[0] else around)
        geometry = shapely.union_all(shapely.make_valid(np.array(parts, dtype=object)))
    elif crs is not None and crs != grid_crs:
        geometry = _transformed(geometry, crs, grid_crs)
    on_grid = shapely.box(left, bottom, right, top)
    return shapely.union_all([shapely.intersection(shapely.affinity.translate(geometry, turn), on_grid)
                              for turn in (-360, 0, 360)])


def _transformed(geometry, crs, to: CRS):
    """``geometry`` from ``crs`` into ``to``, its edges first cut into steps that follow the curve. From degrees to
    degrees each vertex stays on its side of 180°: a datum's shift would move one just past it, and PROJ would take it
    to the far side (Fiji 1986's 180° comes out as -179.9998°)."""
    if geometry.is_empty:  # nothing to cut into steps
        return geometry
    transformer = Transformer.from_crs(crs, to, always_xy=True)
    transform = transformer.transform
    if crs.is_geographic and to.is_geographic:
        def transform(x, y):
            east, north = transformer.transform(x, y)
            return east + 360 * np.round((x - east) / 360), north
    return shapely.transform(shapely.segmentize(geometry, _step(geometry)), transform, interleaved=False)


def _step(geometry) -> float:
    """Vertices added along edges before reprojecting, so that long straight edges follow the curve."""
    left, bottom, right, top = geometry.bounds
    return max(right - left, top - bottom, 1e-9) / 64
