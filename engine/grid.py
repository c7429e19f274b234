"""The common grid of a pair: one CRS, resolution and extent both dates are read on.

By default the pre image's CRS and resolution over the intersection of both footprints, snapped to
the pre image's pixel lattice (so the pre image is read without resampling). A date whose grid
differs is warped on the fly, window by window, through a ``WarpedVRT`` (bilinear).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window

from geochange.engine.errors import OptionError, RasterError
from geochange.engine.rasters import corrupt_pixels

# Below this share of either image inside the common extent, a warning is given.
SMALL_OVERLAP = 0.5


@dataclass(frozen=True)
class Grid:
    crs: CRS
    transform: Affine
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        left, top = self.transform.c, self.transform.f
        return left, top + self.height * self.transform.e, left + self.width * self.transform.a, top

    def matches(self, src) -> bool:
        return (src.crs == self.crs and src.width == self.width and src.height == self.height
                and src.transform.almost_equals(self.transform))


def _resolution(src, crs: CRS) -> tuple[float, float]:
    if src.crs == crs:
        return abs(src.transform.a), abs(src.transform.e)
    transform, _, _ = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
    return abs(transform.a), abs(transform.e)


def _area(b) -> float:
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def common_grid(pre, post, *, on: str = "pre", crs: str | None = None,
                resolution: float | None = None, warn=lambda message: None) -> Grid:
    """The grid both dates are read on: ``on`` the ``pre`` or ``post`` image's CRS and resolution,
    or a given ``crs``/``resolution``; extent = intersection of the two footprints."""
    if on not in ("pre", "post"):
        raise OptionError(f"grid must be 'pre' or 'post', not {on!r}")
    if resolution is not None and not resolution >= 0:  # 0, as None: the reference's resolution
        raise OptionError(f"resolution must not be negative, not {resolution}")
    reference = pre if on == "pre" else post
    for src in (pre, post):
        if src.crs is None:
            raise RasterError(f"{Path(src.name).name}: the raster has no CRS; it cannot be aligned")
    target = CRS.from_user_input(crs) if crs else reference.crs
    res_x, res_y = (resolution, resolution) if resolution else _resolution(reference, target)
    footprints = [transform_bounds(src.crs, target, *src.bounds, densify_pts=21) for src in (pre, post)]
    left, bottom = max(footprints[0][0], footprints[1][0]), max(footprints[0][1], footprints[1][1])
    right, top = min(footprints[0][2], footprints[1][2]), min(footprints[0][3], footprints[1][3])
    if right - left < res_x or top - bottom < res_y:
        raise RasterError(
            "the two rasters do not overlap.\n"
            f"  pre  {Path(pre.name).name}: {tuple(round(v, 6) for v in pre.bounds)} in {pre.crs}\n"
            f"  post {Path(post.name).name}: {tuple(round(v, 6) for v in post.bounds)} in {post.crs}")
    for name, footprint in zip(("pre", "post"), footprints):
        share = _area((left, bottom, right, top)) / _area(footprint)
        if share < SMALL_OVERLAP:
            warn(f"only {100 * share:.1f} % of the {name} image overlaps the other date")
    if target == reference.crs and not resolution:
        # Snap to the reference's own pixel lattice so that it is read without resampling.
        t = reference.transform
        col0 = math.ceil((left - t.c) / t.a - 1e-6)
        col1 = math.floor((right - t.c) / t.a + 1e-6)
        row0 = math.ceil((top - t.f) / t.e - 1e-6)
        row1 = math.floor((bottom - t.f) / t.e + 1e-6)
        return Grid(target, t * Affine.translation(col0, row0), col1 - col0, row1 - row0)
    width, height = int((right - left) // res_x), int((top - bottom) // res_y)
    return Grid(target, Affine(res_x, 0, left, 0, -res_y, top), width, height)


class GridReader:
    """Reads windows of the grid from one dataset: an offset window when the dataset lies on the
    grid's lattice, a bilinear ``WarpedVRT`` otherwise. Outside the dataset, pixels are invalid."""

    def __init__(self, src, grid: Grid):
        self._stack = contextlib.ExitStack()
        self.path = src.name
        t, g = src.transform, grid.transform
        col, row = (g.c - t.c) / t.a, (g.f - t.f) / t.e
        on_lattice = (src.crs == grid.crs and math.isclose(t.a, g.a) and math.isclose(t.e, g.e)
                      and abs(col - round(col)) < 1e-6 and abs(row - round(row)) < 1e-6)
        # Whether GDAL masks any pixel: a warped read marks what lies outside the source.
        self.masked = not on_lattice or _has_mask(src)
        if on_lattice:
            self.dataset, self.offset = src, (int(round(row)), int(round(col)))
        else:
            # Without a nodata value or mask, an alpha band marks what lies outside the source.
            self.dataset = self._stack.enter_context(WarpedVRT(
                src, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                resampling=Resampling.bilinear, add_alpha=src.nodata is None and not _has_mask(src)))
            self.offset = (0, 0)

    def window(self, window: Window) -> Window:
        return Window(window.col_off + self.offset[1], window.row_off + self.offset[0], window.width,
                      window.height)

    def read(self, bands, window: Window):
        return self._read(self.dataset.read, bands, window)

    def read_masks(self, bands, window: Window):
        return self._read(self.dataset.read_masks, bands, window)

    def _read(self, method, bands, window: Window):
        try:
            return method(bands, window=self.window(window))
        except RasterioIOError as e:  # e.g. a file cut short: its header opened, its pixels do not
            raise corrupt_pixels(self.path, e) from None

    def close(self):
        self._stack.close()


def _has_mask(src) -> bool:
    from rasterio.enums import MaskFlags

    return any(MaskFlags.all_valid not in flags for flags in src.mask_flag_enums)
