"""Change polygons from a mask and a probability raster, with areas in square metres."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
from pyproj import CRS
from rasterio.windows import Window
from scipy import ndimage

from geochange.engine.atomic import AtomicOutputs
from geochange.engine.contracts import POLYGON_LAYER
from geochange.engine.errors import OutputError, RasterError, closed_on_failure, gdal_write_errors, output_error
from geochange.engine.grid import Grid, placement
from geochange.engine.measures import map_units, polygon_areas, rings_below, rings_of
from geochange.engine.rasters import open_raster

# Rows of a probability raster that ``vectorize_probability`` reads at a time (in whole blocks, one at least).
VECTORIZE_ROWS = 512
# Output driver by file extension.
DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON", ".shp": "ESRI Shapefile"}


@dataclass
class ChangePolygon:
    geometry: object  # shapely Polygon in the raster's CRS
    area_m2: float
    mean_prob: float
    max_prob: float


def _pixel_polygons(labels: np.ndarray, mask: np.ndarray, row_start: int) -> tuple[np.ndarray, np.ndarray]:
    """The polygons of the 4-connected regions of ``labels`` under ``mask`` in pixel coordinates (rows
    from ``row_start``) and their labels: GDAL's polygonizer into a memory layer, read back as
    Arrow batches of WKB (faster than rasterio's ``shapes``, which builds a GeoJSON mapping of
    every polygon for shapely to rebuild)."""
    from osgeo import gdal, gdal_array, ogr

    regions, valid = gdal_array.OpenArray(labels), gdal_array.OpenArray(mask.view(np.uint8))
    regions.SetGeoTransform((0, 1, 0, row_start, 0, 1))
    source = ogr.GetDriverByName("Memory").CreateDataSource("")  # a layer dies with its source: keep it
    layer = source.CreateLayer("", geom_type=ogr.wkbPolygon)
    layer.CreateField(ogr.FieldDefn("label", ogr.OFTInteger))
    if gdal.Polygonize(regions.GetRasterBand(1), valid.GetRasterBand(1), layer, 0) != 0:
        raise RuntimeError(f"GDAL could not polygonise the rows from {row_start}: {gdal.GetLastErrorMsg()}")
    batches = list(layer.GetArrowStreamAsNumPy())
    return (np.concatenate([shapely.from_wkb(b["wkb_geometry"]) for b in batches]),
            np.concatenate([b["label"] for b in batches]))


def _noded_at_seams(polygons, seams: list[int]) -> np.ndarray:
    """Pixel polygons with a vertex at every pixel corner of their horizontal edges on the rows
    ``seams``. The parts of one region cut at band seams share edges only there, so once noded they
    form a coverage, which GEOS unions in one pass (an overlay union's cascade goes over every vertex
    once per level)."""
    rings, owner = shapely.get_rings(polygons, return_index=True)
    coords, ring = shapely.get_coordinates(rings, return_index=True)
    x, y = coords[:, 0], coords[:, 1]
    next_x, next_y = np.r_[x[1:], 0], np.r_[y[1:], np.nan]
    on_seam = np.r_[ring[1:] == ring[:-1], False] & (next_y == y) & np.isin(y, seams)
    count = 1 + np.where(on_seam, np.abs(next_x - x) - 1, 0).astype(np.int64)  # this corner and those after it
    source = np.repeat(np.arange(len(x)), count)
    step = np.arange(len(source)) - np.repeat(np.cumsum(count) - count, count)
    noded = np.column_stack([x[source] + step * np.sign(next_x - x)[source], y[source]])
    return shapely.polygons(shapely.linearrings(noded, indices=ring[source]), indices=owner)


def _united_exteriors(exteriors, seams: list[int]):
    """The exteriors of the parts of one region, cut at band seams, as one polygon. A part's own
    holes lie inside its band, never on a seam, so they stay holes of the whole: only the exteriors
    need uniting, which spares the union a noisy region's thousands of holes. The parts touch along
    their seam edges, so their union is one polygon, whose holes are those enclosed across the seams."""
    union = shapely.coverage_union_all(_noded_at_seams(shapely.polygons(exteriors), seams))
    if union.geom_type != "Polygon":
        raise RuntimeError(f"the parts of one region united into a {union.geom_type}")
    return union


def simplified(polygons: np.ndarray, tolerance: float) -> np.ndarray:
    """``polygons`` simplified by Douglas-Peucker, each ring on its own, up to ``tolerance``; a polygon whose
    simplified rings collapse or cross goes through GEOS's topology-preserving simplifier instead, so that
    every polygon stays one valid polygon with all its holes.

    Checking the rings' result is cheaper than preserving topology throughout: on a random model's noise
    (16 polygons, 232,000 vertices, 3,870 holes; a 2-core AMD EPYC) GEOS's topology-preserving simplifier
    took 4.2 s, this 0.08 s, and both kept nearly the same vertices (85,520 and 85,512).
    """
    rings, owner, _ = rings_of(polygons)
    simple = shapely.simplify(rings, tolerance, preserve_topology=False)
    intact = (shapely.get_type_id(simple) == shapely.GeometryType.LINEARRING) & \
        (shapely.get_num_coordinates(simple) >= 4)
    whole = np.ones(len(polygons), dtype=bool)
    whole[owner[~intact]] = False
    out = np.array(polygons, dtype=object)
    shapely.polygons(simple[whole[owner]], indices=owner[whole[owner]], out=out)
    redo = ~whole
    redo[whole] = ~shapely.is_valid(out[whole])
    out[redo] = shapely.simplify(polygons[redo], tolerance, preserve_topology=True)
    return out


class PolygonAssembler:
    """Builds change polygons from a mask given band after band of rows, so that memory depends on the
    raster's width only; regions crossing a band seam come out as one polygon.

    Each band's 4-connected regions are vectorised in pixel coordinates (exact integers, so the two
    halves of a region share their seam edge exactly); a region touching the band's last row stays
    pending until the next band shows whether it continues. Holes smaller than ``min_area_m2``
    (geodesic) are filled unless they hold an invalid pixel: a region's own holes in each band as it
    is vectorised, holes enclosed across seams when its parts are merged. Finished regions are mapped
    to the raster's CRS, dropped when smaller than ``min_area_m2``, and simplified (``simplify`` in metres
    whatever the CRS, see ``map_units``, times ``scale``, the projection's map length over ground length there,
    ``Grid.map_scale``; topology preserved). Without a CRS (a pixel grid) areas, ``min_area_m2`` and ``simplify``
    are in pixels, whatever the geotransform that places the polygons.
    """

    def __init__(self, transform, crs, *, min_area_m2: float = 0.0, simplify: float = 0.0, scale: float = 1.0):
        self.transform, self.crs = transform, crs if crs is None or isinstance(crs, str) else crs.to_wkt()
        self.min_area_m2 = min_area_m2
        # Where areas are measured: the raster's CRS, or on a pixel grid the pixels themselves.
        self._to_measured = self._to_map if crs is not None else lambda xy: xy
        pixel_side = math.sqrt(abs(transform.determinant))
        self.simplify = map_units(simplify, self.crs) * scale if crs is not None else simplify * pixel_side
        self._parent: dict[int, int] = {}
        self._pending: dict[int, tuple] = {}  # id -> (pixel polygon, pixels, sum of prob, max prob)
        self._last_row = None  # global ids along the previous band's last row
        self._seams: list[int] = []  # first rows of the bands after the first
        self._next_id = 1
        # One pixel centre (pixel coordinates) of each patch of unchanged pixels holding an invalid one
        # that a hole enclosed across band seams may still take in: such a hole is not filled, so that
        # no invalid pixel lies in a polygon. Only patches that are no region's own hole and touch no
        # side of the raster are kept, and only while a region spanning their rows is pending: one or
        # two a band where nodata is scattered, not one per nodata speck.
        self._invalid_points, self._invalid_rows = np.empty(0, dtype=object), np.empty(0, np.int64)

    def _root(self, i: int) -> int:
        while self._parent[i] != i:
            self._parent[i] = self._parent[self._parent[i]]
            i = self._parent[i]
        return i

    def _to_map(self, xy: np.ndarray) -> np.ndarray:
        """Pixel coordinates ``(N, 2)`` (col, row) to the raster's CRS."""
        t, x, y = self.transform, xy[:, 0], xy[:, 1]
        # Not a matrix product, which BLAS may spread over threads that then spin beside the model's.
        return np.column_stack([t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f])

    def add_band(self, row_start: int, mask: np.ndarray, probability: np.ndarray,
                 valid: np.ndarray | None = None) -> list[ChangePolygon]:
        """Add the rows ``row_start ...`` of the final mask (and of the valid pixels: an invalid one is
        never changed); returns the polygons now complete."""
        mask = np.ascontiguousarray(mask, dtype=bool)
        local, count = ndimage.label(mask)  # 4-connected regions, numbered 1..count
        local = local.astype(np.int32, copy=False)
        offset = self._next_id - 1  # local region i is region i + offset of the whole raster
        if count:
            # Statistics over the region pixels only (a few percent of a band, usually).
            flat = local.ravel()
            at = np.flatnonzero(flat)
            labels = flat[at]
            probs = np.nan_to_num(probability.ravel()[at].astype(np.float64))
            pixels = np.bincount(labels, minlength=count + 1)
            sums = np.bincount(labels, weights=probs, minlength=count + 1)
            maxima = np.zeros(count + 1)
            np.maximum.at(maxima, labels, probs)
            polygons, values = _pixel_polygons(local, mask, row_start)
            if self.min_area_m2 > 0:
                polygons = self._fill_own_holes(polygons, row_start, mask, valid)
            for polygon, i in zip(polygons, values.tolist()):
                self._parent[i + offset] = i + offset
                self._pending[i + offset] = (polygon, int(pixels[i]), float(sums[i]), float(maxima[i]))
            self._next_id += count
        first, last = (np.where(row > 0, row + offset, 0) for row in (local[0], local[-1]))
        if self._last_row is not None:  # link regions that touch across the seam
            self._seams.append(row_start)
            touching = (self._last_row > 0) & (first > 0)
            for above, below in set(zip(self._last_row[touching].tolist(), first[touching].tolist())):
                a, b = self._root(above), self._root(below)
                if a != b:
                    self._parent[max(a, b)] = min(a, b)
        self._last_row = last
        still_open = {self._root(i) for i in np.unique(last[last > 0]).tolist()}
        complete = self._emit(lambda root: root not in still_open)
        if len(self._invalid_rows):  # a hole lies within its region's rows: drop points above them all
            pending = [part[0] for part in self._pending.values()]
            top = shapely.bounds(pending)[:, 1].min() if pending else np.inf  # pixel rows grow downwards
            above = self._invalid_rows < top
            self._invalid_points, self._invalid_rows = self._invalid_points[~above], self._invalid_rows[~above]
        return complete

    def _small(self, holes: np.ndarray) -> np.ndarray:
        """Whether each hole ring (pixel coordinates) encloses less than the minimum area."""
        return rings_below(holes, self.min_area_m2, self._to_measured, self.crs)

    def _fill_own_holes(self, polygons: np.ndarray, row_start: int, mask: np.ndarray,
                        valid: np.ndarray | None) -> np.ndarray:
        """``polygons`` (one band's, pixel coordinates) without their small holes that hold no invalid
        pixel; keeps a point of each other patch of unchanged pixels that holds one (see __init__)."""
        rings, owner, exterior = rings_of(polygons)
        holes = np.flatnonzero(~exterior)
        fill = np.zeros(len(rings), bool)
        fill[holes] = self._small(rings[holes])
        if valid is not None and not valid.all():
            # A hole of a 4-connected region is one 4-connected patch of unchanged pixels: any point
            # inside the hole names it.
            patches, count = ndimage.label(~mask)
            holding = np.bincount(patches[~valid], minlength=count + 1) > 0
            holding[0] = False
            inside = shapely.get_coordinates(shapely.point_on_surface(shapely.polygons(rings[holes])))
            own = patches[inside[:, 1].astype(np.int64) - row_start, inside[:, 0].astype(np.int64)]
            fill[holes] &= ~holding[own]
            # Patches on a side of the raster (or on its first row) are no hole of anything.
            holding[own] = False
            holding[patches[:, [0, -1]]] = False
            if row_start == 0:
                holding[patches[0]] = False
            patch = patches.ravel()
            at = np.flatnonzero(holding[patch])
            first = at[np.unique(patch[at], return_index=True)[1]]
            rows, cols = np.divmod(first, mask.shape[1])
            rows += row_start
            self._invalid_points = np.concatenate([self._invalid_points, shapely.points(cols + 0.5, rows + 0.5)])
            self._invalid_rows = np.concatenate([self._invalid_rows, rows])
        if not fill.any():
            return polygons
        return shapely.polygons(rings[~fill], indices=owner[~fill])

    def _merged(self, parts: list):
        """One polygon of the parts of a region cut at band seams (pixel coordinates), the small holes
        enclosed across the seams filled unless one of the kept points lies in them."""
        rings, _, exterior = rings_of(parts)
        union_rings = shapely.get_rings(_united_exteriors(rings[exterior], self._seams))
        shell, across = union_rings[0], union_rings[1:]
        if self.min_area_m2 > 0 and len(across):
            fill = self._small(across)
            if fill.any() and len(self._invalid_rows):
                tree = shapely.STRtree(shapely.polygons(across[fill]))
                _, holding = tree.query(self._invalid_points, predicate="within")
                fill[np.flatnonzero(fill)[holding]] = False
            across = across[~fill]
        return shapely.polygons(shell, holes=np.concatenate([across, rings[~exterior]]))

    def finish(self) -> list[ChangePolygon]:
        """The polygons still pending after the last band."""
        return self._emit(lambda root: True)

    def _emit(self, complete) -> list[ChangePolygon]:
        groups: dict[int, list[int]] = {}
        for i in self._pending:
            groups.setdefault(self._root(i), []).append(i)
        merged, probabilities = [], []
        for root in sorted(groups):
            if not complete(root):
                continue
            parts = [self._pending.pop(i) for i in groups[root]]
            for i in groups[root]:
                del self._parent[i]
            merged.append(parts[0][0] if len(parts) == 1 else self._merged([p[0] for p in parts]))
            probabilities.append((sum(p[2] for p in parts) / sum(p[1] for p in parts), max(p[3] for p in parts)))
        # Ids of complete groups no longer appear in the open last row: parents of the rest stay.
        if not merged:
            return []
        merged = np.array(merged, dtype=object)
        # The changed pixels' area: the simplified outline's differs.
        areas = polygon_areas(shapely.transform(merged, self._to_measured), self.crs)
        polygons = shapely.transform(merged, self._to_map)
        if self.simplify > 0:  # topology preserved: a polygon never collapses
            # From each ring's canonical first vertex: the result must not depend on where band seams
            # made the ring start (detect's bands against vectorize's whole raster).
            polygons = simplified(shapely.normalize(polygons), self.simplify)
        # One winding in every polygon, exteriors counter-clockwise (GeoJSON's right-hand rule): GDAL's polygonizer,
        # the unions across band seams and GEOS's normal form each leave their own, which geodesic measures misread.
        polygons = shapely.orient_polygons(polygons)
        return [ChangePolygon(polygon, float(area), mean, top)
                for polygon, area, (mean, top) in zip(polygons, areas, probabilities) if area >= self.min_area_m2]


def change_polygons(mask: np.ndarray, probability: np.ndarray, transform, crs, *, min_area_m2: float = 0.0,
                    simplify: float = 0.0, scale: float = 1.0, valid: np.ndarray | None = None) -> list[ChangePolygon]:
    """All change polygons of a mask held in memory (one band; ``scale`` as ``PolygonAssembler``'s)."""
    assembler = PolygonAssembler(transform, crs, min_area_m2=min_area_m2, simplify=simplify, scale=scale)
    return assembler.add_band(0, mask, probability, valid) + assembler.finish()


class PolygonWriter:
    """Appends polygons to a vector file (format by extension) opened once, under a temporary name of
    ``outputs``, which gives it its final name ``path`` (with a shapefile's side files) on commit.
    Whatever GDAL fails to write raises ``OutputError`` naming ``path``.

    Fields: ``id, area_m2`` (``area_px`` without a CRS), ``mean_prob, max_prob`` and the string fields of ``extra``.
    """

    def __init__(self, path: str | os.PathLike, crs, outputs: AtomicOutputs, *, layer: str = POLYGON_LAYER,
                 extra: dict | None = None):
        from osgeo import gdal, ogr, osr

        self._ogr, self._gdal = ogr, gdal
        self.path = Path(path)
        driver_name = DRIVERS.get(self.path.suffix.lower())
        if driver_name is None:
            raise ValueError(f"{self.path}: unsupported vector format; use one of {', '.join(DRIVERS)}")
        srs = None  # a pixel grid: no CRS, areas in pixels
        if crs is not None:
            srs = osr.SpatialReference()
            srs.ImportFromWkt(CRS.from_user_input(crs).to_wkt())
            srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
            if driver_name == "GeoJSON" and srs.GetAuthorityCode(None) is None and srs.AutoIdentifyEPSG() != 0:
                raise OutputError(f"{self.path}: GeoJSON names a CRS by its code only, and this one ({srs.GetName()}) "
                                  "has none: readers would take the polygons for longitudes and latitudes; write a "
                                  "GeoPackage or a shapefile, or choose a grid CRS with an EPSG code")
        self.area_field = "area_m2" if crs is not None else "area_px"
        self.extra = dict(extra or {})
        self._temporary = outputs.path(self.path)
        self._ds = self._layer = None
        with closed_on_failure(self.close), gdal_write_errors(self.path):
            self._ds = ogr.GetDriverByName(driver_name).CreateDataSource(str(self._temporary))
            if self._ds is None:
                raise output_error(self.path, f"cannot create a {driver_name} file: {gdal.GetLastErrorMsg()}")
            # A shapefile's fields (a date's file name) in UTF-8, named in its .cpg: Latin-1, its default, loses others
            options = ["ENCODING=UTF-8"] if driver_name == "ESRI Shapefile" else []
            self._layer = self._ds.CreateLayer(layer, srs, ogr.wkbMultiPolygon, options=options)
            if self._layer is None:
                raise output_error(self.path, f"cannot create a {driver_name} layer: {gdal.GetLastErrorMsg()}")
            fields = {"id": ogr.OFTInteger64, self.area_field: ogr.OFTReal, "mean_prob": ogr.OFTReal,
                      "max_prob": ogr.OFTReal, **dict.fromkeys(self.extra, ogr.OFTString)}
            for name, kind in fields.items():
                if self._layer.CreateField(ogr.FieldDefn(name, kind)) != 0:
                    raise output_error(self.path, f"cannot add the field {name}: {gdal.GetLastErrorMsg()}")
        self.count = 0
        self.area_m2 = 0.0

    def write(self, polygons: list[ChangePolygon]) -> None:
        ogr, gdal = self._ogr, self._gdal
        defn = self._layer.GetLayerDefn()
        with gdal_write_errors(self.path):
            if self._layer.StartTransaction() != 0:
                raise output_error(self.path, gdal.GetLastErrorMsg())
            for p in polygons:
                self.count += 1
                self.area_m2 += p.area_m2
                feature = ogr.Feature(defn)
                feature.SetField("id", self.count)
                feature.SetField(self.area_field, p.area_m2)
                feature.SetField("mean_prob", p.mean_prob)
                feature.SetField("max_prob", p.max_prob)
                for name, value in self.extra.items():
                    feature.SetField(name, str(value))
                feature.SetGeometry(ogr.ForceToMultiPolygon(ogr.CreateGeometryFromWkb(p.geometry.wkb)))
                if self._layer.CreateFeature(feature) != 0:
                    raise output_error(self.path, f"cannot add polygon {self.count}: {gdal.GetLastErrorMsg()}")
            if self._layer.CommitTransaction() != 0:
                raise output_error(self.path, gdal.GetLastErrorMsg())

    def finish(self) -> None:
        """Flush and close the file before its rename, and read it back: some drivers (GeoJSON) say
        nothing when the disk is full."""
        with gdal_write_errors(self.path):
            self._layer = self._ds = None
            written = self._ogr.Open(str(self._temporary))
            count = written.GetLayer(0).GetFeatureCount() if written is not None else None
        if count != self.count:
            raise output_error(self.path, f"{self.count} polygons were written, {count or 0} read back")

    def close(self) -> None:
        """Close an aborted file, removed after: what GDAL reports closing it does not matter."""
        with contextlib.suppress(OutputError), gdal_write_errors(self.path):
            self._layer = self._ds = None


def write_polygons(polygons: list[ChangePolygon], path: str | os.PathLike, crs, **options) -> Path:
    """Write ``polygons`` to ``path`` atomically (see ``PolygonWriter``)."""
    with AtomicOutputs() as outputs:
        writer = PolygonWriter(path, crs, outputs, **options)
        try:
            writer.write(polygons)
            writer.finish()
        finally:
            writer.close()
    return Path(path)


def vectorize_probability(probability: str, polygons: str, *, threshold: float = 0.5, band: int = 1,
                          min_area: float = 0.0, simplify: float = 0.0, polygon_layer: str = POLYGON_LAYER,
                          progress=None) -> dict:
    """Polygons of ``probability > threshold`` in one band of an existing probability raster.

    Pixels that GDAL masks (nodata, e.g. the -1 of ``detect``'s output) or that are NaN are never
    changed; polygons and their statistics are those ``detect`` would have written. The raster is read in bands
    of rows, as ``detect`` writes it: the memory follows its width, not its size.
    """
    with open_raster(probability) as src:
        if not 1 <= band <= src.count:
            raise RasterError(f"{Path(probability).name}: band {band} does not exist "
                              f"(the raster has {src.count})")
        transform = placement(src)  # without a CRS (a pixel grid): areas, --min-area and --simplify in pixels
        if src.crs is None and progress is not None:
            progress.log(f"{Path(probability).name} has no CRS: areas, --min-area and --simplify are in pixels")
        assembler = PolygonAssembler(transform, src.crs, min_area_m2=min_area, simplify=simplify,
                                     scale=Grid(src.crs, transform, src.width, src.height).map_scale())
        block = src.block_shapes[band - 1][0]
        rows = max(1, VECTORIZE_ROWS // block) * block  # whole blocks of rows: each block decoded once
        changed_pixels = valid_pixels = 0
        with AtomicOutputs(inputs=(probability,)) as outputs:  # a GeoPackage's raster: its polygons would replace it
            writer = PolygonWriter(polygons, src.crs, outputs, layer=polygon_layer)
            try:
                for row_start in range(0, src.height, rows):
                    window = Window(0, row_start, src.width, min(rows, src.height - row_start))
                    prob = src.read(band, window=window).astype(np.float32)
                    valid = (src.read_masks(band, window=window) > 0) & np.isfinite(prob)
                    changed = valid & (prob > threshold)  # strict, as detect's mask is
                    changed_pixels += np.count_nonzero(changed)
                    valid_pixels += np.count_nonzero(valid)
                    writer.write(assembler.add_band(row_start, changed, np.where(valid, prob, 0), valid))
                    if progress is not None:
                        progress.update(row_start + window.height, src.height)
                        progress.check()
                writer.write(assembler.finish())
                writer.finish()
            finally:
                writer.close()
    if progress is not None:
        progress.log(f"{changed_pixels} of {valid_pixels} valid pixels above {threshold:g}")
    return {"polygons": str(polygons), "polygon_count": writer.count, "changed_area_m2": writer.area_m2,
            "area_unit": "m²" if writer.area_field == "area_m2" else "px"}  # as detect's worker result says it
