"""Change polygons from a mask and a probability raster, with areas in square metres."""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
import shapely.affinity
from affine import Affine
from pyproj import CRS, Geod, Transformer
from rasterio.features import shapes
from shapely.geometry import Polygon, shape
from shapely.geometry.polygon import orient
from skimage.measure import label as label_components

from geochange.engine.atomic import atomic_path
from geochange.engine.errors import RasterError
from geochange.engine.rasters import open_raster

_GEOD = Geod(ellps="WGS84")
# Output driver by file extension.
DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON", ".shp": "ESRI Shapefile"}


@dataclass
class ChangePolygon:
    geometry: object  # shapely Polygon in the raster's CRS
    area_m2: float
    mean_prob: float
    max_prob: float


@functools.lru_cache(maxsize=16)
def _to_lonlat(crs_text: str) -> Transformer | None:
    """The transformer to longitude/latitude of a CRS (None for EPSG:4326), built once per CRS:
    building it costs about a millisecond, as much as the area of a polygon."""
    crs = CRS.from_user_input(crs_text)
    return None if crs.to_epsg() == 4326 else Transformer.from_crs(crs, "EPSG:4326", always_xy=True)


def geodesic_area(geometry, crs) -> float:
    """Area on the WGS84 ellipsoid in m2, whatever the CRS (projected areas are distorted)."""
    to_lonlat = _to_lonlat(crs if isinstance(crs, str) else crs.to_wkt())
    if to_lonlat is not None:
        geometry = shapely.transform(geometry, to_lonlat.transform, interleaved=False)
    # Geod signs each ring by its orientation: exterior counter-clockwise, holes clockwise.
    return abs(_GEOD.geometry_area_perimeter(orient(geometry, sign=1.0))[0])


class PolygonAssembler:
    """Builds change polygons from a mask given band after band of rows, so that memory depends on the
    raster's width only; regions crossing a band seam come out as one polygon.

    Each band's 4-connected regions are vectorised in pixel coordinates (exact integers, so the two
    halves of a region share their seam edge exactly); a region touching the band's last row stays
    pending until the next band shows whether it continues. Finished regions are merged, mapped to
    the raster's CRS, stripped of holes and dropped when smaller than ``min_area_m2`` (geodesic), and
    simplified (``simplify`` in map units, topology preserved).
    """

    def __init__(self, transform, crs, *, min_area_m2: float = 0.0, simplify: float = 0.0):
        self.transform, self.crs = transform, crs if isinstance(crs, str) else crs.to_wkt()
        self.min_area_m2, self.simplify = min_area_m2, simplify
        self._parent: dict[int, int] = {}
        self._pending: dict[int, tuple] = {}  # id -> (pixel polygon, pixels, sum of prob, max prob)
        self._last_row = None  # global ids along the previous band's last row
        self._next_id = 1

    def _root(self, i: int) -> int:
        while self._parent[i] != i:
            self._parent[i] = self._parent[self._parent[i]]
            i = self._parent[i]
        return i

    def add_band(self, row_start: int, mask: np.ndarray, probability: np.ndarray) -> list[ChangePolygon]:
        """Add the rows ``row_start ...`` of the final mask; returns the polygons now complete."""
        local = label_components(mask.astype(bool), connectivity=1).astype(np.int32)
        count = int(local.max())
        ids = np.where(local > 0, local + (self._next_id - 1), 0)
        if count:
            flat = local.ravel()
            probs = np.nan_to_num(probability.ravel().astype(np.float64))
            pixels = np.bincount(flat, minlength=count + 1)
            sums = np.bincount(flat, weights=probs, minlength=count + 1)
            maxima = np.zeros(count + 1)
            np.maximum.at(maxima, flat, probs)
            pixel_grid = Affine.translation(0, row_start)
            for geom, value in shapes(local, mask=local > 0, connectivity=4, transform=pixel_grid):
                i = int(value)
                gid = i + self._next_id - 1
                self._parent[gid] = gid
                self._pending[gid] = (shape(geom), int(pixels[i]), float(sums[i]), float(maxima[i]))
            self._next_id += count
        if self._last_row is not None:  # link regions that touch across the seam
            touching = (self._last_row > 0) & (ids[0] > 0)
            for above, below in set(zip(self._last_row[touching].tolist(), ids[0][touching].tolist())):
                a, b = self._root(above), self._root(below)
                if a != b:
                    self._parent[max(a, b)] = min(a, b)
        self._last_row = ids[-1].copy()
        still_open = {self._root(i) for i in np.unique(self._last_row[self._last_row > 0]).tolist()}
        return self._emit(lambda root: root not in still_open)

    def finish(self) -> list[ChangePolygon]:
        """The polygons still pending after the last band."""
        return self._emit(lambda root: True)

    def _emit(self, complete) -> list[ChangePolygon]:
        groups: dict[int, list[int]] = {}
        for i in self._pending:
            groups.setdefault(self._root(i), []).append(i)
        done = []
        for root in sorted(groups):
            if not complete(root):
                continue
            parts = [self._pending.pop(i) for i in groups[root]]
            for i in groups[root]:
                del self._parent[i]
            merged = parts[0][0] if len(parts) == 1 else shapely.union_all([p[0] for p in parts])
            polygon = self._finish_geometry(merged)
            if polygon is None:
                continue
            area = geodesic_area(polygon, self.crs)
            if area >= self.min_area_m2:
                pixels = sum(p[1] for p in parts)
                done.append(ChangePolygon(polygon, area, sum(p[2] for p in parts) / pixels,
                                          max(p[3] for p in parts)))
        # Ids of complete groups no longer appear in the open last row: parents of the rest stay.
        return done

    def _finish_geometry(self, pixel_polygon):
        t = self.transform
        polygon = shapely.affinity.affine_transform(pixel_polygon, [t.a, t.b, t.d, t.e, t.c, t.f])
        if self.min_area_m2 > 0:  # holes smaller than the minimum area are filled
            polygon = Polygon(polygon.exterior, [ring for ring in polygon.interiors
                                                 if geodesic_area(Polygon(ring), self.crs) >= self.min_area_m2])
        if self.simplify > 0:
            polygon = polygon.simplify(self.simplify, preserve_topology=True)
        return None if polygon.is_empty else polygon


def change_polygons(mask: np.ndarray, probability: np.ndarray, transform, crs, *, min_area_m2: float = 0.0,
                    simplify: float = 0.0) -> list[ChangePolygon]:
    """All change polygons of a mask held in memory (one band)."""
    assembler = PolygonAssembler(transform, crs, min_area_m2=min_area_m2, simplify=simplify)
    return assembler.add_band(0, mask, probability) + assembler.finish()


class PolygonWriter:
    """Appends polygons to a vector file (format by extension) opened once, under a temporary name.

    Fields: ``id, area_m2, mean_prob, max_prob`` and the string fields of ``extra``. ``close()``
    renames the finished file (and a shapefile's side files) to ``path``; ``abort()`` removes it.
    """

    def __init__(self, path: str | os.PathLike, crs, *, layer: str = "changes", extra: dict | None = None):
        from osgeo import ogr, osr

        self._ogr = ogr
        self.path = Path(path)
        driver_name = DRIVERS.get(self.path.suffix.lower())
        if driver_name is None:
            raise ValueError(f"{self.path}: unsupported vector format; use one of {', '.join(DRIVERS)}")
        srs = osr.SpatialReference()
        srs.ImportFromWkt(CRS.from_user_input(crs).to_wkt())
        srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        self.extra = dict(extra or {})
        self._atomic = atomic_path(self.path)
        self._tmp = self._atomic.__enter__()
        self._ds = ogr.GetDriverByName(driver_name).CreateDataSource(str(self._tmp))
        if self._ds is None:
            self.abort()
            raise OSError(f"{self.path}: GDAL cannot create a {driver_name} file here")
        self._layer = self._ds.CreateLayer(layer, srs, ogr.wkbMultiPolygon)
        self._layer.CreateField(ogr.FieldDefn("id", ogr.OFTInteger64))
        for name in ("area_m2", "mean_prob", "max_prob"):
            self._layer.CreateField(ogr.FieldDefn(name, ogr.OFTReal))
        for name in self.extra:
            self._layer.CreateField(ogr.FieldDefn(name, ogr.OFTString))
        self.count = 0
        self.area_m2 = 0.0

    def write(self, polygons: list[ChangePolygon]) -> None:
        ogr = self._ogr
        defn = self._layer.GetLayerDefn()
        self._layer.StartTransaction()
        for p in polygons:
            self.count += 1
            self.area_m2 += p.area_m2
            feature = ogr.Feature(defn)
            feature.SetField("id", self.count)
            feature.SetField("area_m2", p.area_m2)
            feature.SetField("mean_prob", p.mean_prob)
            feature.SetField("max_prob", p.max_prob)
            for name, value in self.extra.items():
                feature.SetField(name, str(value))
            feature.SetGeometry(ogr.ForceToMultiPolygon(ogr.CreateGeometryFromWkb(p.geometry.wkb)))
            self._layer.CreateFeature(feature)
        self._layer.CommitTransaction()

    def close(self) -> Path:
        self._layer = self._ds = None  # flushes and closes the file before the rename
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        self._layer = self._ds = None
        self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)


def write_polygons(polygons: list[ChangePolygon], path: str | os.PathLike, crs, **options) -> Path:
    """Write ``polygons`` to ``path`` atomically (see ``PolygonWriter``)."""
    writer = PolygonWriter(path, crs, **options)
    try:
        writer.write(polygons)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def vectorize_probability(probability: str, polygons: str, *, threshold: float = 0.5, band: int = 1,
                          min_area: float = 0.0, simplify: float = 0.0, progress=None) -> dict:
    """Polygons of ``probability > threshold`` in one band of an existing probability raster.

    Pixels that GDAL masks (nodata, e.g. the -1 of ``detect``'s output) or that are NaN are never
    changed; polygons and their statistics are those ``detect`` would have written.
    """
    with open_raster(probability) as src:
        if not 1 <= band <= src.count:
            raise RasterError(f"{Path(probability).name}: band {band} does not exist "
                              f"(the raster has {src.count})")
        if src.crs is None:
            raise RasterError(f"{Path(probability).name}: the raster has no CRS; polygon areas "
                              "cannot be computed")
        prob = src.read(band).astype(np.float32)
        valid = src.read_masks(band) > 0
        transform, crs = src.transform, src.crs
    valid &= np.isfinite(prob)
    changed = valid & (prob > threshold)  # strict, as detect's mask is
    if progress is not None:
        progress.log(f"{np.count_nonzero(changed)} of {np.count_nonzero(valid)} valid pixels above "
                     f"{threshold:g}")
        progress.check()
    found = change_polygons(changed, np.where(valid, prob, 0), transform, crs, min_area_m2=min_area,
                            simplify=simplify)
    write_polygons(found, polygons, crs)
    return {"polygons": str(polygons), "polygon_count": len(found),
            "changed_area_m2": float(sum(p.area_m2 for p in found))}
