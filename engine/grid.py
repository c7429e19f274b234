"""The common grid of a pair: one CRS, resolution and extent both dates are read on.

By default the pre image's CRS and resolution over the intersection of both footprints, snapped to
the pre image's pixel lattice (so the pre image is read without resampling). A date whose grid
differs is warped on the fly, window by window, through a ``WarpedVRT`` (bilinear). The grid is always
north-up: a rotated or sheared date is warped onto it, as GDAL's warper does.
"""
from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyproj
from affine import Affine
from osgeo import osr
from rasterio._err import CPLE_BaseError  # GDAL's errors as rasterio raises them (not public)
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.env import Env
from rasterio.errors import CRSError, RasterioError, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from geochange.engine.errors import OptionError, RasterError
from geochange.engine.measures import METRES_PER_DEGREE, metres_per_unit
from geochange.engine.rasters import corrupt_pixels, has_mask, open_raster, valid_mask, zeroed_where_invalid

# Below this share of either image inside the common extent, a warning is given.
SMALL_OVERLAP = 0.5
# Past a million by a million pixels (4 TB of float32 probability), a grid is taken for a mistaken
# resolution or CRS rather than a run to start; GDAL's rasters have at most 2**31 - 1 pixels a side.
MAX_PIXELS = 10**12
MAX_SIDE = 2**31 - 1
TRUE_SCALE_TOLERANCE = 0.01  # how far from true a projection's scale may be for its units to count as ground metres
# A pixel grid's transform: column x, row -y (QGIS's placement of a raster without a geotransform).
PIXEL_TRANSFORM = Affine(1, 0, 0, 0, -1, 0)


@dataclass(frozen=True)
class Grid:
    crs: CRS | None  # None: a pixel grid (see ``pixel_grid``)
    transform: Affine
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        left, top = self.transform.c, self.transform.f
        return left, top + self.height * self.transform.e, left + self.width * self.transform.a, top

    @property
    def pixel_side(self) -> float:
        """A pixel's side in the CRS's units (the geometric mean of its width and height)."""
        return math.sqrt(abs(self.transform.a * self.transform.e))

    def pixel_metres(self) -> float | None:
        """A pixel's side in metres (in a geographic CRS, at the grid's middle latitude); None for a pixel grid."""
        if self.crs is None:
            return None
        if self.crs.is_geographic:
            return self.pixel_side * math.sqrt(METRES_PER_DEGREE * self.metres_per_degree_east())
        return self.pixel_side * metres_per_unit(self.crs) / self.map_scale()

    def map_scale(self) -> float:
        """Map length over ground length at the grid's middle, as a projected grid's lengths in metres are measured:
        ``projection_scale``, or 1 within 1 % of true scale, where the CRS's units are taken as the ground's (UTM's
        0.9996-1.001), as a raster's producer states its resolution: a model's 2 m then reads a 2 m UTM grid, not one
        to resample. 1 in a geographic CRS, whose lengths in metres ``map_units`` and ``pixel_metres`` measure, and on
        a pixel grid, whose lengths are pixels."""
        if self.crs is None or self.crs.is_geographic:
            return 1.0
        scale = self.projection_scale()
        return scale if abs(scale - 1) > TRUE_SCALE_TOLERANCE else 1.0

    def projection_scale(self) -> float:
        """The projection's linear scale at the grid's middle, map length over ground length (Web Mercator's is 2
        at 60°: its 1 m pixels are 0.5 m on the ground), the square root of its areal scale; 1 where PROJ cannot
        tell (a local CRS)."""
        try:
            crs = pyproj.CRS.from_wkt(self.crs.to_wkt())
            x, y = self.transform * (self.width / 2, self.height / 2)
            lon, lat = pyproj.Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True).transform(x, y)
            scale = math.sqrt(pyproj.Proj(crs).get_factors(lon, lat).areal_scale)
        except (pyproj.exceptions.ProjError, pyproj.exceptions.CRSError, AttributeError, TypeError, ValueError):
            return 1.0
        return scale if math.isfinite(scale) and scale > 0 else 1.0

    def metres_per_degree_east(self) -> float:
        """Metres in a degree of longitude at the grid's middle latitude (a geographic grid)."""
        middle = math.radians(self.transform.f + self.height * self.transform.e / 2)
        return METRES_PER_DEGREE * max(math.cos(middle), 1e-6)

    def side_of(self, metres: float) -> float:
        """The pixel side, in the CRS's units, that measures ``metres`` as ``pixel_metres`` measures this grid's
        (georeferenced grids only)."""
        return metres * self.pixel_side / self.pixel_metres()

    @property
    def past_antimeridian(self) -> bool:
        """A geographic grid reaching past 180° or -180° (a pair across the antimeridian, ``common_grid``)."""
        left, _, right, _ = self.bounds
        return self.crs is not None and self.crs.is_geographic and not -180 <= left <= right <= 180

    def matches(self, src) -> bool:
        return (src.crs == self.crs and src.width == self.width and src.height == self.height
                and placement(src).almost_equals(self.transform))


def placement(src) -> Affine:
    """Where a dataset's pixels lie: its geotransform; for one with neither a CRS nor a geotransform (rasterio's
    identity), a pixel grid's (``PIXEL_TRANSFORM``), as QGIS draws it and ``detect`` writes its outputs."""
    return PIXEL_TRANSFORM if src.crs is None and src.transform.is_identity else src.transform


def too_large(width: float, height: float) -> bool:
    """Whether a grid of this many pixels is past ``MAX_PIXELS`` or ``MAX_SIDE``."""
    return width * height > MAX_PIXELS or max(width, height) > MAX_SIDE


def north_up(transform: Affine) -> bool:
    """Rows run south and columns east, unrotated and unsheared: read without warping only then."""
    return transform.b == transform.d == 0 and transform.a > 0 > transform.e


def _resolution(src, crs: CRS) -> tuple[float, float]:
    """The pixel size of ``src`` in ``crs``: its own (along its rows and columns, however rotated),
    or GDAL's suggested output resolution in another CRS (which takes a rotation into account)."""
    if src.crs == crs:
        return src.res
    with WarpedVRT(src, crs=crs) as vrt:
        return vrt.res


def _extent(src) -> tuple[float, float, float, float]:
    """(left, bottom, right, top) of a raster's four corners, however it is rotated, sheared or flipped."""
    xs, ys = zip(*(src.transform * corner for corner in
                   ((0, 0), (src.width, 0), (0, src.height), (src.width, src.height))))
    return min(xs), min(ys), max(xs), max(ys)


def crs_name(crs: CRS) -> str:
    """A CRS as a user knows it: its EPSG code, or its name (not a page of WKT)."""
    code = crs.to_epsg()
    return f"EPSG:{code}" if code else f'"{pyproj.CRS.from_wkt(crs.to_wkt()).name}"'


def is_local(crs) -> bool:
    """An engineering CRS (a site's own frame, a drone survey's), which GDAL cannot place on Earth."""
    return pyproj.CRS.from_wkt(crs.to_wkt()).is_engineering


def _area(b) -> float:
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def _one_longitude_range(footprints, reference: int) -> list:
    """Geographic footprints in one run of longitudes: one across the antimeridian (GDAL gives it with left >
    right) continued past 180°, each then moved by whole turns to lie nearest the reference's, whose pixel
    lattice the grid keeps. The grid may then reach past 180° (or -180°): GDAL reads and writes such rasters."""
    unwrapped = [(left, bottom, right + 360 if right < left else right, top) for left, bottom, right, top in footprints]
    middle = (unwrapped[reference][0] + unwrapped[reference][2]) / 2
    return [(left + turn, bottom, right + turn, top) for left, bottom, right, top in unwrapped
            for turn in [360 * round((middle - (left + right) / 2) / 360)]]


def lon_wrap_proj4(crs, middle: float) -> str:
    """A geographic ``crs`` as a PROJ string whose longitudes PROJ wraps around ``middle`` (``lon_wrap``). GDAL's
    export keeps the datum's shift to WGS84, which rasterio's (``+init=epsg:N``) loses."""
    srs = osr.SpatialReference()
    srs.ImportFromWkt(crs.to_wkt())
    return f"{srs.ExportToProj4()} +lon_wrap={middle}"


def _wrapped_longitudes(src, grid: Grid) -> CRS | None:
    """For a warped read of a geographic ``src`` where it or the grid reaches past ±180°: its CRS with longitudes
    wrapped around its middle, so that the grid's pixels find its own; GDAL's warper puts every longitude in
    -180°..180° and missed half of a raster across the antimeridian. None where the plain CRS does."""
    if grid.crs is None or src.crs is None or not src.crs.is_geographic:
        return None
    left, _, right, _ = _extent(src)
    if -180 <= left and right <= 180 and not grid.past_antimeridian:
        return None
    return CRS.from_proj4(lon_wrap_proj4(src.crs, (left + right) / 2))


def warped_on(src, grid: Grid, resampling: Resampling) -> WarpedVRT:
    """``src`` warped onto ``grid``, with an alpha band where it needs one (``warp_needs_alpha``)."""
    return WarpedVRT(src, src_crs=_wrapped_longitudes(src, grid) or src.crs, src_transform=placement(src),
                     crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                     resampling=resampling, add_alpha=warp_needs_alpha(src))


def common_grid(pre, post, *, on: str = "pre", crs: str | None = None,
                resolution: float | None = None, warn=lambda message: None) -> Grid:
    """The grid both dates are read on: ``on`` the ``pre`` or ``post`` image's CRS and resolution,
    or a given ``crs``/``resolution``; extent = intersection of the two footprints."""
    if on not in ("pre", "post"):
        raise OptionError(f"grid must be 'pre' or 'post', not {on!r}")
    if resolution is not None and not resolution >= 0:  # 0, as None: the reference's resolution
        raise OptionError(f"resolution must not be negative, not {resolution}")
    reference = pre if on == "pre" else post
    if pre.crs is None and post.crs is None:
        return pixel_grid(pre, post, crs=crs, resolution=resolution, warn=warn)
    for src, other in ((pre, post), (post, pre)):
        if src.crs is None:
            raise RasterError(f"{Path(src.name).name}: the raster has no CRS while {Path(other.name).name} has "
                              "one; it cannot be aligned with it")
    try:
        with Env():  # GDAL's own complaint goes to rasterio's log, not to stderr
            target = CRS.from_user_input(crs) if crs else reference.crs
    except CRSError:  # whose message, "The WKT could not be parsed", misleads for an EPSG code
        raise OptionError(f"crs {crs!r} is not a coordinate reference system GDAL knows "
                          "(an EPSG code, WKT or PROJ string)") from None
    if crs and pyproj.CRS.from_wkt(target.to_wkt()).is_geocentric:  # its x and y would cut through the Earth
        raise OptionError(f"crs {crs!r} is geocentric (x, y, z from the Earth's centre), no map: choose a projected "
                          "or geographic CRS")
    try:
        with Env():  # GDAL's complaint goes to rasterio's log: the error below says it
            res_x, res_y = (resolution, resolution) if resolution else _resolution(reference, target)
            footprints = [_extent(src) if src.crs == target else  # a local CRS transforms not even to itself
                          transform_bounds(src.crs, target, *_extent(src), densify_pts=21) for src in (pre, post)]
    except (CPLE_BaseError, RasterioError) as error:  # e.g. a local (engineering) CRS, tied to no place on Earth
        moved = [src for src in (pre, post) if src.crs != target]
        names = " and ".join(f"{Path(src.name).name} (CRS {crs_name(src.crs)})" for src in moved or (pre, post))
        local = any(is_local(crs) for crs in (pre.crs, post.crs, target))
        why = "a local CRS is tied to no place on Earth" if local else str(error).splitlines()[0]
        raise RasterError(f"{names}: GDAL cannot transform to {crs_name(target)}, the grid's CRS ({why}); reproject "
                          "the rasters to one CRS, or give both the same CRS if they share one frame") from None
    if target.is_geographic:
        footprints = _one_longitude_range(footprints, 0 if on == "pre" else 1)
    left, bottom = max(footprints[0][0], footprints[1][0]), max(footprints[0][1], footprints[1][1])
    right, top = min(footprints[0][2], footprints[1][2]), min(footprints[0][3], footprints[1][3])
    if resolution and right - left > 0 and top - bottom > 0 and (right - left < res_x or top - bottom < res_y):
        raise OptionError(f"resolution {resolution:g} is coarser than the overlap of the two rasters "
                          f"({right - left:.6g} x {top - bottom:.6g} in {target})")

    def no_overlap(how: str = "") -> RasterError:
        return RasterError(
            f"the two rasters do not overlap{how}.\n"
            f"  pre  {Path(pre.name).name}: {tuple(round(v, 6) for v in _extent(pre))} in {pre.crs}\n"
            f"  post {Path(post.name).name}: {tuple(round(v, 6) for v in _extent(post))} in {post.crs}")

    if right - left < res_x or top - bottom < res_y:
        raise no_overlap()
    for name, footprint in zip(("pre", "post"), footprints):
        share = _area((left, bottom, right, top)) / _area(footprint)
        if share < SMALL_OVERLAP:
            warn(f"only {100 * share:.1f} % of the {name} image overlaps the other date")
    if target == reference.crs and not resolution and north_up(reference.transform):
        # Snap to the reference's own pixel lattice so that it is read without resampling.
        t = reference.transform
        col0 = math.ceil((left - t.c) / t.a - 1e-6)
        col1 = math.floor((right - t.c) / t.a + 1e-6)
        row0 = math.ceil((top - t.f) / t.e - 1e-6)
        row1 = math.floor((bottom - t.f) / t.e + 1e-6)
        if col1 <= col0 or row1 <= row0:  # a pixel's width of overlap, but across two of the reference's pixels
            raise no_overlap(f" by one whole pixel of {Path(reference.name).name}")
        return Grid(target, t * Affine.translation(col0, row0), col1 - col0, row1 - row0)
    # Whole pixels, to a millionth of one: 7.0 / 0.1 is 69.99999999999999 in floating point.
    width, height = math.floor((right - left) / res_x + 1e-6), math.floor((top - bottom) / res_y + 1e-6)
    if too_large(width, height):
        raise OptionError(f"the common grid would be {width:.4g} x {height:.4g} px at a resolution of "
                          f"{res_x:.4g} x {res_y:.4g} in {target} (at most {MAX_PIXELS:.0e} px and "
                          f"{MAX_SIDE} px a side); choose a coarser resolution")
    return Grid(target, Affine(res_x, 0, left, 0, -res_y, top), int(width), int(height))


def pixel_grid(pre, post, *, crs=None, resolution=None, warn=lambda message: None) -> Grid:
    """Two rasters without a CRS (plain images such as a dataset's PNG tiles) paired pixel for pixel:
    they must be of one size and place. The grid has no CRS and their geotransform, so that outputs and inputs
    overlay in QGIS; without one, x is the column and y minus the row, as QGIS draws such a raster."""
    names = [Path(src.name).name for src in (pre, post)]
    if not placement(pre).almost_equals(placement(post)):  # e.g. world files placing them apart
        raise RasterError(f"neither {names[0]} nor {names[1]} has a CRS, and their geotransforms differ: give "
                          "them a CRS (gdal_edit.py -a_srs) so that they can be aligned")
    if (pre.width, pre.height) != (post.width, post.height):
        raise RasterError(f"neither {names[0]} ({pre.width}x{pre.height} px) nor {names[1]} ({post.width}x"
                          f"{post.height} px) has a CRS, and their sizes differ: without a CRS only rasters of "
                          "one size are paired, pixel for pixel")
    if crs or resolution:
        raise OptionError(f"{'crs' if crs else 'resolution'} needs georeferenced rasters: neither {names[0]} nor "
                          f"{names[1]} has a CRS")
    warn(f"neither raster has a CRS: they are paired pixel for pixel ({pre.width}x{pre.height} px); the outputs "
         "have no CRS and areas are in pixels")
    return Grid(None, placement(pre), pre.width, pre.height)


class GridReader:
    """Reads windows of the grid from one dataset: an offset window when the dataset lies on the
    grid's lattice, a bilinear ``WarpedVRT`` otherwise. Outside the dataset, pixels are invalid."""

    def __init__(self, src, grid: Grid):
        self._stack = contextlib.ExitStack()
        self.path = src.name
        t, g = src.transform, grid.transform
        col, row = (0, 0) if grid.crs is None else ~t * (g.c, g.f)  # the grid's origin in the dataset's pixels
        on_lattice = grid.crs is None or (  # a pixel grid is the dataset's own
            src.crs == grid.crs and north_up(t) and math.isclose(t.a, g.a) and math.isclose(t.e, g.e)
            and abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6
            and -grid.width < col < src.width)  # it meets the grid: not the same lattice a turn of the Earth away
        # Whether GDAL masks any pixel: a warped read marks what lies outside the source.
        self.masked = not on_lattice or has_mask(src)
        if on_lattice:
            self.dataset, self.offset = src, (int(round(row)), int(round(col)))
        else:
            self.dataset = self._stack.enter_context(warped_on(src, grid, Resampling.bilinear))
            self.offset = (0, 0)
        # What ``rasters.read_masks`` looks up to find an alpha band GDAL makes no mask of: asked once, not a window.
        self.colorinterp, self.dtypes = self.dataset.colorinterp, self.dataset.dtypes

    def window(self, window: Window) -> Window:
        return Window(window.col_off + self.offset[1], window.row_off + self.offset[0], window.width,
                      window.height)

    def read(self, bands, window: Window):
        return self._read(self.dataset.read, bands, window)

    def read_masks(self, bands, window: Window):
        """GDAL's masks; ``rasters.read_masks`` (through ``colorinterp`` and ``dtypes``) those of any alpha band."""
        return self._read(self.dataset.read_masks, bands, window)

    def _read(self, method, bands, window: Window):
        try:
            return method(bands, window=self.window(window))
        except RasterioIOError as e:  # e.g. a file cut short: its header opened, its pixels do not
            raise corrupt_pixels(self.path, e) from None

    def close(self):
        self._stack.close()


def warp_needs_alpha(src) -> bool:
    """Whether a ``WarpedVRT`` of ``src`` needs an alpha band to mark what lies outside it and what its mask band
    masks: not where its nodata value does (the warper writes it there) nor where it has an alpha band, which the
    VRT carries (GDAL refuses a second). Without one, a VRT of a raster with a mask band is valid everywhere."""
    return src.nodata is None and ColorInterp.alpha not in src.colorinterp


class PairReader:
    """Thread-safe window reader of both dates on a common grid: each thread opens its own datasets.
    ``aoi`` (``engine.aoi.AreaOfInterest``): pixels outside it are invalid."""

    def __init__(self, pre_path, post_path, grid: Grid, pre_bands: list[int], post_bands: list[int], aoi=None):
        self.paths, self.grid, self.bands, self.aoi = (pre_path, post_path), grid, (pre_bands, post_bands), aoi
        self._local = threading.local()
        self._opened: list = []
        self._lock = threading.Lock()

    def _readers(self):
        if not hasattr(self._local, "readers"):
            datasets = [open_raster(p) for p in self.paths]
            readers = [GridReader(d, self.grid) for d in datasets]
            with self._lock:
                self._opened += readers + datasets
            self._local.readers = readers
        return self._local.readers

    def __call__(self, window):
        out, ok = [], np.ones((int(window.height), int(window.width)), bool)
        for reader, bands in zip(self._readers(), self.bands):
            data = reader.read(bands, window)
            ok &= valid_mask(reader, window, data, bands, reader.masked)
            out.append(data)
        pre, post = zeroed_where_invalid(*out, ok)  # no NaN leaks into the model through convolutions
        # Outside the area of interest the pixels are real: the model sees them, the outputs do not.
        return pre, post, ok if self.aoi is None else ok & self.aoi.mask(window, self.grid)

    def close(self) -> None:
        for item in self._opened:
            item.close()
