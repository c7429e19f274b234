"""Detection at the model's pixel size (``--resolution model``): the grid the model reads both dates on, at
the ground sampling distance its package records, and its probability brought back onto the output grid.

The model's rows are staged, as they are released, in a float32 GeoTIFF beside the probability output
(named as its temporaries are: the next run into the folder removes a killed run's); once the last is in,
the output grid's rows are read from it through a bilinear ``WarpedVRT``, band by band, so that memory
follows the rasters' widths as in any run. Where the output's pixels are coarser, GDAL widens the
bilinear kernel: an output pixel is the weighted mean of the model's pixels under it.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
from affine import Affine
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from geochange.engine.atomic import remove_quietly
from geochange.engine.contracts import PROBABILITY_NODATA
from geochange.engine.errors import OptionError
from geochange.engine.grid import Grid, PairReader, too_large
from geochange.engine.measures import METRES_PER_DEGREE
from geochange.engine.outputs import BLOCK, StagedRaster
from geochange.engine.rasters import open_raster


def model_grid(grid: Grid, gsd: float | None) -> Grid:
    """``grid``'s extent in pixels that measure ``gsd`` metres a side (the model's), covering it whole from its
    top-left corner (where a date at the model's pixel size often lies: it is then read as it is), or centred on it
    along an axis where the last pixel would hang half or more off it: GDAL's warper leaves nodata a pixel whose
    centre lies off the data, and with it the output pixels under it. ``grid`` itself where its pixels measure
    that already. In a geographic CRS they are square on the ground at the grid's middle latitude, not in degrees
    (at 60°, half as many degrees wide as high)."""
    if gsd is None:
        raise OptionError("--resolution model: this model records no ground sampling distance (gsd, the metres "
                          "per pixel of its training imagery); give --resolution in the CRS's units instead")
    if grid.crs is None:
        raise OptionError("--resolution model needs georeferenced rasters: without a CRS a pixel has no size "
                          "in metres")
    t = grid.transform
    if grid.crs.is_geographic:  # square on the ground at the grid's middle latitude: a degree east is shorter there
        x_side, y_side = gsd / grid.metres_per_degree_east(), gsd / METRES_PER_DEGREE
    else:
        x_side = y_side = grid.side_of(gsd)
    if math.isclose(x_side, t.a, rel_tol=1e-9) and math.isclose(y_side, -t.e, rel_tol=1e-9):
        return grid
    # A hair less than a whole pixel is taken as whole: the float sides of an exact multiple.
    width, height = math.ceil(grid.width * t.a / x_side - 1e-6), math.ceil(grid.height * -t.e / y_side - 1e-6)
    if too_large(width, height):
        raise OptionError(f"--resolution model: at the model's {gsd:g} m pixels the grid would be {width} x {height} "
                          "px, too large; cut the area with --aoi, or give --resolution in the CRS's units")
    over_x, over_y = width * x_side - grid.width * t.a, height * y_side + grid.height * t.e
    left = t.c - (over_x / 2 if over_x >= x_side / 2 else 0.0)
    top = t.f + (over_y / 2 if over_y >= y_side / 2 else 0.0)
    return Grid(grid.crs, Affine(x_side, 0, left, 0, -y_side, top), width, height)


def on_output_grid(bands: Iterator[tuple[int, np.ndarray, np.ndarray]], model: Grid, reader: PairReader,
                   scratch: Path, name: Path) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(first row, probability, valid)`` bands of the output grid (``reader.grid``) from those of ``model``:
    the probability resampled (NaN where no model pixel came back), valid where both dates are at the
    output's pixels (``reader``, which the area of interest limits too). ``scratch``: where the model's rows
    are staged; it and ``reader`` are closed however the bands end. ``name``: the output that write errors name."""
    grid, staged = reader.grid, None
    try:
        staged = StagedRaster(scratch, model, "float32", PROBABILITY_NODATA, average=False, compress="NONE",
                              name=name, overviews=False)
        for start, probability, valid in bands:
            staged.write(start, np.where(valid & np.isfinite(probability), probability, PROBABILITY_NODATA), valid)
        staged.finish()
        with open_raster(scratch) as src, WarpedVRT(
                src, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                resampling=Resampling.bilinear, nodata=PROBABILITY_NODATA) as warped:
            for top in range(0, grid.height, BLOCK):
                window = Window(0, top, grid.width, min(BLOCK, grid.height - top))
                probability = warped.read(1, window=window)
                yield top, np.where(probability == PROBABILITY_NODATA, np.nan, probability), reader(window)[2]
    finally:
        if staged is not None:
            staged.close()
        reader.close()
        remove_quietly(scratch)
