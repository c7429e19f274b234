"""The outputs of a detection, written band of rows by band of rows as the rows are finished.

Probability and mask are staged as tiled GeoTIFFs and turned into Cloud-Optimised GeoTIFFs when the
last row is in (the stage uses ZSTD level 1, about 10x cheaper to write than DEFLATE, and the
conversion compresses on every core: the probability with ZSTD, the mask with DEFLATE); polygons are
assembled across band seams and appended to the vector file. Nothing appears under a final name
before ``close()``; ``abort()`` (error, cancel) removes every temporary.
"""
from __future__ import annotations

import contextlib
import numpy as np
import rasterio
import rasterio.shutil
from rasterio.windows import Window

from geochange.engine.atomic import atomic_path
from geochange.engine.grid import Grid
from geochange.engine.vectorize import PolygonAssembler, PolygonWriter

PROBABILITY_NODATA = -1.0
MASK_NODATA = 127  # the mask holds 0 (no change) and 255 (change)


def _stage_profile(grid: Grid, dtype: str, nodata) -> dict:
    return {"driver": "GTiff", "width": grid.width, "height": grid.height, "count": 1, "dtype": dtype,
            "crs": grid.crs, "transform": grid.transform, "nodata": nodata, "tiled": True,
            "blockxsize": 512, "blockysize": 512, "compress": "zstd", "zstd_level": 1, "BIGTIFF": "IF_SAFER"}


class ChangeWriter:
    def __init__(self, grid: Grid, *, probability, mask, polygons, threshold: float, min_area: float = 0.0,
                 simplify: float = 0.0, attributes: dict | None = None):
        self.grid, self.threshold = grid, threshold
        self._stack = contextlib.ExitStack()
        self._finals = []  # (stage path, temporary final path, COG options) converted at close
        try:
            # A probability's low bits are noise, which no codec shrinks: ZSTD level 1 gives the size of
            # DEFLATE level 1 in half its time (16384² TinyCD: 1136 MB in 8.7 s against 1143 MB in 17.6 s).
            self._prob = self._stage(probability, "float32", PROBABILITY_NODATA,
                                     {"COMPRESS": "ZSTD", "RESAMPLING": "AVERAGE", "PREDICTOR": 3, "LEVEL": 1})
            self._mask = self._stage(mask, "uint8", MASK_NODATA,
                                     {"COMPRESS": "DEFLATE", "RESAMPLING": "NEAREST", "PREDICTOR": 2})
            self._assembler = PolygonAssembler(grid.transform, grid.crs, min_area_m2=min_area, simplify=simplify)
            self._polygons = PolygonWriter(polygons, grid.crs, extra=attributes)
        except BaseException:
            self._stack.close()
            raise

    def _stage(self, path, dtype, nodata, cog_options: dict):
        final = self._stack.enter_context(atomic_path(path))
        stage = final.with_name(final.stem + ".stage.tif")
        self._finals.append((stage, final, cog_options))
        # Only the COG copy is kept: the staged file goes before the final one is renamed.
        self._stack.callback(stage.unlink, missing_ok=True)
        return self._stack.enter_context(rasterio.open(stage, "w", **_stage_profile(self.grid, dtype, nodata)))

    def write_rows(self, row_start: int, probability: np.ndarray, valid: np.ndarray) -> None:
        """Final rows ``row_start ...``: probability (NaN where nothing ran) and the valid mask."""
        valid = valid & np.isfinite(probability)
        changed = valid & (probability > self.threshold)  # strict, as argmax and the authors do
        window = Window(0, row_start, self.grid.width, probability.shape[0])
        self._prob.write(np.where(valid, probability, PROBABILITY_NODATA).astype(np.float32), 1, window=window)
        self._mask.write(np.where(valid, np.where(changed, 255, 0), MASK_NODATA).astype(np.uint8), 1,
                         window=window)
        self._polygons.write(self._assembler.add_band(row_start, changed, probability))

    @property
    def polygon_count(self) -> int:
        return self._polygons.count

    @property
    def changed_area_m2(self) -> float:
        return self._polygons.area_m2

    def close(self) -> None:
        """Finish the polygons, convert the rasters to COGs and move everything to its final name."""
        try:
            self._polygons.write(self._assembler.finish())
            self._prob.close()
            self._mask.close()
            for stage, final, options in self._finals:
                rasterio.shutil.copy(stage, final, driver="COG", BLOCKSIZE=512,
                                     OVERVIEWS="AUTO", BIGTIFF="IF_SAFER", NUM_THREADS="ALL_CPUS", **options)
        except BaseException:
            self.abort()
            raise
        self._polygons.close()
        self._stack.close()

    def abort(self) -> None:
        self._polygons.abort()
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
