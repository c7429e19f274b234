"""The outputs of a detection, written band of rows by band of rows as the rows are finished.

Probability and mask are staged as tiled GeoTIFFs whose overviews are built as the rows arrive, and
copied into Cloud-Optimised GeoTIFFs when the last row is in (the copy compresses on every core: the
probability and the mask with ZSTD); polygons are assembled across band seams and appended to
the vector file. Nothing appears under a final name before ``close()``, which renames all three
together; ``abort()`` (error, cancel) removes every temporary. Whatever GDAL fails to write (a full
disk) raises ``OutputError`` naming the output.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from geochange.engine.atomic import AtomicOutputs, remove_quietly
from geochange.engine.contracts import MASK_CHANGE, MASK_NO_CHANGE, MASK_NODATA, POLYGON_LAYER, PROBABILITY_NODATA
from geochange.engine.errors import OutputError, closed_on_failure, gdal_write_errors, output_error
from geochange.engine.grid import Grid
from geochange.engine.progress import Progress
from geochange.engine.vectorize import PolygonAssembler, PolygonWriter

BLOCK = 512


def overview_factors(width: int, height: int) -> list[int]:
    """The overviews GDAL's COG driver makes by default: halving until the larger side fits a block."""
    factors = []
    while -(-max(width, height) // (factors[-1] if factors else 1)) > BLOCK:
        factors.append(2 * factors[-1] if factors else 2)
    return factors


def _halve(levels: np.ndarray, average: bool) -> np.ndarray:
    """``(channels, rows, cols)`` -> every 2x2 block summed (``average``: channels are sums and
    counts), or its top-left pixel (as GDAL's nearest overviews); a last odd row or column stands alone."""
    if not average:
        return levels[:, ::2, ::2]
    _, rows, cols = levels.shape
    if rows % 2 or cols % 2:
        levels = np.pad(levels, ((0, 0), (0, rows % 2), (0, cols % 2)))
    pairs = levels[:, 0::2] + levels[:, 1::2]
    return pairs[:, :, 0::2] + pairs[:, :, 1::2]


class StagedRaster:
    """A one-band tiled GeoTIFF written band of rows by band of rows, top to bottom, whose internal
    overviews are filled as the rows arrive, so that the COG copy at the end only copies: GDAL would
    read the whole raster again to build them. Each level halves the
    one below; ``average`` levels are the mean of the valid pixels under them, others take the top-left
    pixel: GDAL's AVERAGE and NEAREST where the sides halve evenly. (Where a side is odd, its last
    pixel stands alone here; GDAL spreads the overview's pixels over it, at most one pixel apart. Where
    nodata is spread unevenly, GDAL's AVERAGE of a level is the mean of the means of the level below,
    not of the valid pixels.) ``overviews=False``: none, for a raster only read back whole (``resample``)."""

    def __init__(self, path: Path, grid: Grid, dtype: str, nodata: float, *, average: bool, compress: str,
                 name: Path | None = None, overviews: bool = True):
        from osgeo import gdal, gdal_array

        self.dtype, self.nodata, self.average, self.height = np.dtype(dtype), nodata, average, grid.height
        self.name = name or path  # the output that errors name
        self._ds, self._levels = None, []
        with closed_on_failure(self.close), gdal_write_errors(self.name):
            self._ds = gdal.GetDriverByName("GTiff").Create(
                str(path), grid.width, grid.height, 1, gdal_array.NumericTypeCodeToGDALTypeCode(self.dtype),
                # BigTIFF always: GDAL's size estimate at creation leaves out the overviews added after it.
                options=["TILED=YES", f"BLOCKXSIZE={BLOCK}", f"BLOCKYSIZE={BLOCK}", f"COMPRESS={compress}",
                         "BIGTIFF=YES"])
            if self._ds is None:
                raise output_error(self.name, gdal.GetLastErrorMsg())
            self._ds.SetGeoTransform(grid.transform.to_gdal())
            if grid.crs is not None:  # a pixel grid is written without a CRS
                self._ds.SetProjection(grid.crs.to_wkt())
            self._levels = [self._ds.GetRasterBand(1)]
            self._levels[0].SetNoDataValue(nodata)
            factors = overview_factors(grid.width, grid.height) if overviews else []
            if factors and self._ds.BuildOverviews("NONE", factors) != 0:  # empty levels
                raise output_error(self.name, f"cannot add overviews: {gdal.GetLastErrorMsg()}")
            # Inside: on a full disk the overviews' directory write fails here, where GDAL's exceptions are on.
            self._levels += [self._levels[0].GetOverview(i) for i in range(self._levels[0].GetOverviewCount())]
        self._next_row = [0] * len(self._levels)
        self._carry = [None] * len(self._levels)  # per overview level, an odd row waiting for its pair

    def write(self, row_start: int, values: np.ndarray, valid: np.ndarray) -> None:
        """Rows ``row_start ...`` (right below those written before), ``values`` holding nodata where
        not ``valid``."""
        if row_start != self._next_row[0]:
            raise ValueError(f"rows from {row_start} given where rows from {self._next_row[0]} come next")
        last = row_start + len(values) == self.height
        if self.average:  # valid sums and counts (filled in place: a 16384-wide band is 29 MB a channel)
            rows = np.zeros((2, *values.shape), np.float32)
            np.copyto(rows[0], values, where=valid)
            rows[1] = valid
        else:
            rows = values[None]
        self._put(0, values)
        for level in range(1, len(self._levels)):
            if self._carry[level] is not None:
                rows = np.concatenate([self._carry[level], rows], axis=1)
            paired = len(rows[0]) if last else len(rows[0]) // 2 * 2
            # A copy: the mask's rows may be views of the caller's array.
            self._carry[level] = rows[:, paired:].copy() if paired < len(rows[0]) else None
            rows = _halve(rows[:, :paired], self.average)
            if not len(rows[0]):
                break
            if self.average:
                with np.errstate(invalid="ignore", divide="ignore"):
                    self._put(level, np.where(rows[1] > 0, rows[0] / rows[1], self.nodata))
            else:
                self._put(level, rows[0])

    def _put(self, level: int, values: np.ndarray) -> None:
        # Written to GDAL's block cache: a block it flushes to disk meanwhile may fail, whatever it returns.
        with gdal_write_errors(self.name):
            if self._levels[level].WriteArray(values.astype(self.dtype, copy=False), 0, self._next_row[level]) != 0:
                from osgeo import gdal
                raise output_error(self.name, f"rows from {self._next_row[level]} (overview level {level}): "
                                              f"{gdal.GetLastErrorMsg()}")
        self._next_row[level] += len(values)

    def finish(self) -> None:
        """Close a raster whose every row was written; what GDAL cannot write to the file then (the
        blocks still in its cache) raises ``OutputError``."""
        if self._next_row[0] != self.height:  # its pyramid would be unfinished
            raise ValueError(f"only {self._next_row[0]} of {self.height} rows were written")
        with gdal_write_errors(self.name):
            self._levels = []
            self._ds = None  # flushes and closes the file

    def close(self) -> None:
        """End an aborted raster, whose file is removed after: what GDAL reports closing it does not matter."""
        with contextlib.suppress(OutputError), gdal_write_errors(self.name):
            self._levels = []
            self._ds = None


class ChangeWriter:
    def __init__(self, grid: Grid, *, probability, mask, polygons, threshold: float, min_area: float = 0.0,
                 simplify: float = 0.0, attributes: dict | None = None, polygon_layer: str = POLYGON_LAYER,
                 inputs=()):
        self.grid, self.threshold = grid, threshold
        self._stack = contextlib.ExitStack()
        self._finals = []  # (stage path, temporary path, output, COG options) converted at close
        try:
            # Entered first, left last: the files are closed and the stages removed before the renames.
            # Exclusive: a second run into the same folders is refused, and a killed run's temporaries go.
            # ``inputs``: the files the run reads, which no output may replace.
            self._outputs = self._stack.enter_context(AtomicOutputs(exclusive=True, inputs=inputs))
            # The probability is staged uncompressed (its low bits are noise, which no codec shrinks
            # much) and copied with ZSTD level 1: DEFLATE level 1's size, faster. The mask (staged in ZSTD) is
            # copied with ZSTD level 1 too: a mosaic of LEVIR's label (4096²) took 12 ms and 250 kB, against 85 ms
            # and 222 kB in DEFLATE with a predictor.
            self._prob = self._stage(probability, "float32", PROBABILITY_NODATA, compress="NONE", average=True,
                                     cog_options={"COMPRESS": "ZSTD", "PREDICTOR": 3, "LEVEL": 1})
            self._mask = self._stage(mask, "uint8", MASK_NODATA, compress="ZSTD", average=False,
                                     cog_options={"COMPRESS": "ZSTD", "LEVEL": 1})
            self._assembler = PolygonAssembler(grid.transform, grid.crs, min_area_m2=min_area, simplify=simplify,
                                               scale=grid.map_scale())
            self._polygons = PolygonWriter(polygons, grid.crs, self._outputs, layer=polygon_layer, extra=attributes)
            self._stack.callback(self._polygons.close)
        except BaseException:
            self.abort()
            raise

    def _stage(self, path, dtype, nodata, *, compress: str, average: bool, cog_options: dict) -> StagedRaster:
        temporary = self._outputs.path(path)
        stage = temporary.with_name(temporary.stem + ".stage.tif")
        self._finals.append((stage, temporary, path, cog_options))
        # Only the COG copy is kept: the staged file goes before the final one is renamed.
        self._stack.callback(remove_quietly, stage)
        raster = StagedRaster(stage, self.grid, dtype, nodata, average=average, compress=compress, name=path)
        self._stack.callback(raster.close)
        return raster

    def write_rows(self, row_start: int, probability: np.ndarray, valid: np.ndarray) -> None:
        """Final rows ``row_start ...`` (each band right below the last): probability (NaN where
        nothing ran) and the valid mask."""
        valid = valid & np.isfinite(probability)
        changed = valid & (probability > self.threshold)  # strict, as argmax and the authors do
        self._prob.write(row_start, np.where(valid, probability, PROBABILITY_NODATA), valid)
        mask = np.where(changed, np.uint8(MASK_CHANGE),
                        np.where(valid, np.uint8(MASK_NO_CHANGE), np.uint8(MASK_NODATA)))
        self._mask.write(row_start, mask, valid)
        self._polygons.write(self._assembler.add_band(row_start, changed, probability, valid))

    @property
    def polygon_count(self) -> int:
        return self._polygons.count

    @property
    def changed_area_m2(self) -> float:
        return self._polygons.area_m2

    def close(self, progress: Progress | None = None) -> None:
        """Finish the polygons, convert the rasters to COGs and move everything to its final name.
        ``progress``: the polygons, then each conversion as GDAL reports it; a cancel stops a conversion."""
        from osgeo import gdal

        progress = progress or Progress()
        steps = 1 + len(self._finals)
        try:
            self._prob.finish()
            self._mask.finish()
            self._polygons.write(self._assembler.finish())
            self._polygons.finish()
            progress.update(1, steps)
            for step, (stage, temporary, output, options) in enumerate(self._finals, start=1):
                options = dict(options, BLOCKSIZE=BLOCK, OVERVIEWS="FORCE_USE_EXISTING", BIGTIFF="IF_SAFER",
                               NUM_THREADS="ALL_CPUS")

                def report(fraction, message, data, step=step):  # GDAL stops the copy where this gives 0
                    progress.update(step + fraction, steps)
                    return not progress.cancelled()

                try:
                    with gdal_write_errors(output):
                        copy = gdal.GetDriverByName("COG").CreateCopy(
                            str(temporary), gdal.Open(str(stage)),
                            options=[f"{k}={v}" for k, v in options.items()], callback=report)
                        if copy is None:
                            raise output_error(output, gdal.GetLastErrorMsg())
                        del copy  # flushes and closes the file
                except OutputError:
                    progress.check()  # the copy stopped by a cancel
                    raise
                progress.update(step + 1, steps)
        except BaseException:
            self.abort()
            raise
        self._stack.close()

    def abort(self) -> None:
        self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)
