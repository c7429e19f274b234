"""Detection over a raster pair of any size: check the inputs against the model, stream the windows
(``stream``), write the outputs as their rows are finished (``outputs``), and size what the run keeps in
memory (the batch, GDAL's block cache) to the machine.
"""
from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from geochange.engine.aoi import AreaOfInterest, area_of_interest
from geochange.engine.atomic import check_outputs, scratch_path
from geochange.engine.bands import band_order_warning, check_dates_order, select_bands
from geochange.engine.contracts import POLYGON_LAYER
from geochange.engine.errors import OptionError, RasterError
from geochange.engine.grid import Grid, PairReader, common_grid
from geochange.engine.hardware import physical_memory
from geochange.engine.inputs import model_channels
from geochange.engine.options import MODEL_RESOLUTION, DetectOptions
from geochange.engine.outputs import BLOCK, ChangeWriter
from geochange.engine.package import ModelPackage, RouterPackage, load_model
from geochange.engine.backends import resolve_backend
from geochange.engine.predictor import Predictor, model_tta, resolve_device, resolve_precision
from geochange.engine.process import bound_gdal_cache
from geochange.engine.progress import Phases, Progress
from geochange.engine.rasters import check_two_dates, open_raster
from geochange.engine.resample import model_grid, on_output_grid
from geochange.engine.routing import RouterPredictor
from geochange.engine.stream import default_readers, on_cpu, stream_rows
from geochange.engine.windows import WindowPlan, check_tiling


@dataclass
class DetectResult:
    probability: Path
    mask: Path
    polygons: Path
    polygon_count: int
    changed_area_m2: float
    grid: Grid


@dataclass
class DetectSetup:
    """Everything a run needs once the inputs are checked: model, common grid, bands, window plan."""

    predictor: Predictor | RouterPredictor
    grid: Grid  # the outputs'
    bands: tuple[list[int], list[int]]
    plan: WindowPlan  # over the grid the model reads on
    threshold: float
    paths: tuple[Path, Path]
    readers: int  # reader threads (0: read in the model's thread)
    batch: int  # windows per model call, lowered to fit the machine's memory
    options: DetectOptions
    aoi: AreaOfInterest | None = None
    model_grid: Grid | None = None  # where the model reads on another grid (--resolution model)

    def reader(self, grid: Grid | None = None) -> PairReader:
        """Both dates' windows on ``grid``, by default the one the model reads on."""
        grid = grid or self.model_grid or self.grid
        aoi = self.aoi
        if aoi is not None and grid is self.model_grid:
            # Resampled back, an output pixel takes the model pixels around it, which may lie just outside the area
            # of interest: those within two model pixels of it are read too (the output's reader cuts the area).
            aoi = AreaOfInterest(aoi.geometry.buffer(2 * max(grid.transform.a, -grid.transform.e)), aoi.source)
        return PairReader(*self.paths, grid, *self.bands, aoi=aoi)


# Pixels up to this many times finer or coarser than the model's are taken without a warning.
SCALE_TOLERANCE = 2.0
# Seconds a megapixel of each part of a run takes (bench/results.md: TinyCD in bf16 at 4096² and 16384²), the
# weights of its progress: the windows' pixels (overlaps counted) read and run on this project's CPU, and
# on an H100, where four reader threads set the pace; the output rows staged and vectorised; read back from
# the model's grid (--resolution model); the COG copies at the end.
SECONDS_PER_MPX = {"windows on cpu": 1.45, "windows on gpu": 0.1, "rows": 0.065, "resample": 0.05, "finish": 0.05}


def blocks_in_use(width: int, tile: int, dates, readers: int = 1) -> int:
    """Bytes of GDAL blocks a run over a grid this wide keeps in use at once: each date's blocks under
    a tile row of windows (which straddles a block row), once per reader thread (each has its own
    datasets), and the outputs' under a band of rows (two block rows of float32 and uint8, a third
    more for their overviews). A warped date is counted at the grid's resolution: an estimate, which
    the cache's margin and its 256 MB floor absorb."""
    inputs = sum((tile + src.block_shapes[0][0]) * width * sum(np.dtype(src.dtypes[b - 1]).itemsize for b in bands)
                 for src, bands in dates)
    return readers * inputs + 2 * BLOCK * width * (4 + 1) * 4 // 3


def warn_scale(grid: Grid, manifest: dict, log) -> None:
    """Say so when the pixels are more than ``SCALE_TOLERANCE`` times finer or coarser than those the model
    was trained on (the manifest's ``gsd``): a model finds what it learned at its scale (LEVIR-CD's
    buildings, 0.5 m pixels, are a pixel or two at 10 m), and how to read both dates at its pixel size."""
    gsd, size = manifest.get("gsd"), grid.pixel_metres()
    if gsd is None or size is None or max(size / gsd, gsd / size) <= SCALE_TOLERANCE:
        return
    factor, way = (size / gsd, "coarser") if size > gsd else (gsd / size, "finer")
    log(f"the model was trained on {gsd:g} m pixels and these are {size:.3g} m ({factor:.1f} times "
        f"{way}): expect it to miss changes; --resolution {MODEL_RESOLUTION} reads both dates at the model's "
        f"pixel size and brings the results back onto this grid (--resolution {grid.side_of(gsd):.6g} makes "
        "the outputs' pixels the model's)")


def fit_batch(plan: WindowPlan, batch: int, channels: int, log=lambda message: None) -> int:
    """``batch``, lowered where the least memory the run needs exceeds the machine's; a tile too large
    for even one window is refused. The least: each window's float32 model input (``channels`` of both
    dates) and the rows blended for a tile row (two float32 sums and a validity byte a pixel). The
    model's activations come on top, so what is refused could never have run."""
    memory, gib = physical_memory(), 2**30
    if memory is None:
        return batch
    h, w = min(plan.tile, plan.height), min(plan.tile, plan.width)
    per_window, rows = h * w * channels * 4, h * plan.width * 9
    fits = (memory - rows) // per_window
    if fits < 1:
        raise OptionError(f"a tile of {plan.tile} px over a grid {plan.width} px wide needs at least "
                          f"{(rows + per_window) / gib:.1f} GiB, more than this machine's {memory / gib:.1f} GiB "
                          "of memory: lower the tile size")
    used = min(batch, len(plan.cols))  # a batch never spans two tile rows
    if used > fits:
        log(f"batch lowered from {batch} to {fits} windows: {used} windows of {h}x{w} px need at least "
            f"{(rows + used * per_window) / gib:.1f} GiB, more than this machine's {memory / gib:.1f} GiB of memory")
        return fits
    return batch


def prepare(pre_path, post_path, model, options: DetectOptions = DetectOptions(), *, readers: int | None = None,
            size_gdal_cache: bool = False, progress: Progress | None = None) -> DetectSetup:
    """Load the model, check both rasters against it and find their common grid (see ``detect``).
    ``size_gdal_cache``: bound GDAL's block cache, process-wide, to this run's (``process.bound_gdal_cache``);
    for the programs that own their process (the command line, the worker)."""
    progress, o = progress or Progress(), options
    package = model if isinstance(model, (ModelPackage, RouterPackage)) else load_model(model)

    first = package.original if isinstance(package, RouterPackage) else package
    tile = o.tile
    if tile is None:  # the window the model was trained on
        tile = first.tile
        progress.log(f"windows of {tile} px: the model's tile" + ("" if "tile" in first.manifest else
                                                                   " (none recorded: the default)"))
    check_tiling(tile, o.overlap)
    tta = model_tta(first.manifest) if o.tta else None
    if tta:
        progress.log(f"test-time augmentation: scales {tta['scales']}" + " x left-right flip" * tta["flip"])

    # Decided once for every member of a router package, and said once.
    device = resolve_device(o.device)
    precision = resolve_precision(o.precision, device, progress.log)
    backend, why = resolve_backend(o.backend, device)
    progress.log(f"backend {backend}: {why}")

    def predictor_of(member: ModelPackage) -> Predictor:
        return Predictor(member, device, precision=precision, backend=backend, tta=tta, sar_db=o.sar_db,
                         scales={"pre": o.pre_scale, "post": o.post_scale}, log=progress.log)

    inputs = first.manifest["inputs"]
    with open_raster(pre_path) as pre, open_raster(post_path) as post:
        check_two_dates(pre_path, post_path)
        at_model = o.resolution == MODEL_RESOLUTION  # the outputs on the grid raster's pixels, the model on its own
        common = common_grid(pre, post, on=o.grid, crs=o.crs, resolution=None if at_model else o.resolution,
                             warn=progress.log)
        aoi = None if o.aoi is None else area_of_interest(o.aoi, common)
        if aoi is not None:
            common = aoi.crop(common)
            progress.log(f"area of interest {o.aoi}: the grid cut to its bounds")
        read_on = model_grid(common, first.manifest.get("gsd")) if at_model else common
        if at_model:
            x, y = f"{read_on.transform.a:.6g}", f"{-read_on.transform.e:.6g}"  # in degrees, square on the ground
            size = f"{x} CRS units a side" if x == y else f"{x} x {y} CRS units"
            progress.log(f"both dates read at the model's {first.manifest['gsd']:g} m pixels "
                         + (f"({size}), its probability resampled onto the {common.width}x{common.height} px output "
                            "grid" if read_on != common else "(the grid's own)"))
        else:
            warn_scale(common, first.manifest, progress.log)
        check_dates_order((pre.count, post.count), inputs, (o.pre_bands, o.post_bands),
                          (Path(pre.name).name, Path(post.name).name))
        bands = (select_bands(pre.count, inputs["pre"], "pre", o.pre_bands and list(o.pre_bands), Path(pre.name).name),
                 select_bands(post.count, inputs["post"], "post", o.post_bands and list(o.post_bands),
                              Path(post.name).name))
        for src, date, chosen in ((pre, "pre", bands[0]), (post, "post", bands[1])):
            colours = [colour.name for colour in src.colorinterp]
            if said := band_order_warning(colours, inputs[date], date, chosen, Path(src.name).name):
                progress.log(said)
        # Made once the inputs passed: an export or a compile takes up to minutes at an analyst's first run.
        if isinstance(package, RouterPackage):
            predictor = RouterPredictor(package, predictor_of)
            progress.log(f"O-P routing: original model and {len(package.teachers)} teachers, CAR thresholds "
                         f"{package.thresholds}")
        else:
            predictor = predictor_of(package)
        readers = default_readers(predictor) if readers is None else readers
        if size_gdal_cache:
            bound_gdal_cache(blocks_in_use(max(common.width, read_on.width), tile, [(pre, bands[0]), (post, bands[1])],
                                           max(1, readers)))
    plan = WindowPlan(read_on.height, read_on.width, tile, o.overlap)
    batch = fit_batch(plan, o.batch, model_channels(inputs["pre"]) + model_channels(inputs["post"]), progress.log)
    threads = torch.get_num_threads()
    on = f"cpu, {threads} thread{'s' * (threads != 1)}" if on_cpu(predictor) else predictor.device
    place = f"in {read_on.crs}" if read_on.crs is not None else "without a CRS"
    progress.log(f"{read_on.width}x{read_on.height} px {place}: {len(plan)} windows of "
                 f"{min(tile, read_on.height)}x{min(tile, read_on.width)} px on {on}")
    return DetectSetup(predictor, common, bands, plan, package.threshold if o.threshold is None else o.threshold,
                       (Path(pre_path), Path(post_path)), readers, batch, o, aoi,
                       None if read_on == common else read_on)


def run_progress(setup: DetectSetup, progress: Progress) -> Phases:
    """A run's progress in three parts, weighed by the time each takes (``SECONDS_PER_MPX``): the windows
    (read and run, ``stream_rows``), the output grid's rows written (rasters staged, polygons; read back
    from the model's grid first under --resolution model), the outputs finished (``ChangeWriter.close``)."""
    plan, grid, seconds = setup.plan, setup.grid, SECONDS_PER_MPX
    windows = len(plan) * min(plan.tile, plan.height) * min(plan.tile, plan.width) / 1e6
    window = seconds["windows on cpu" if on_cpu(setup.predictor) else "windows on gpu"]
    row = seconds["rows"] + seconds["resample"] * (setup.model_grid is not None)
    pixels = grid.width * grid.height / 1e6
    return Phases(progress, {"windows": windows * window, "rows": pixels * row, "finish": pixels * seconds["finish"]})


def write_outputs(setup: DetectSetup, bands: Iterator[tuple[int, np.ndarray, np.ndarray]], *, probability, mask,
                  polygons, polygon_layer: str = POLYGON_LAYER, progress: Phases | None = None) -> DetectResult:
    """Write finished row bands as they come (one band in flight in a writer thread, while the model runs
    the next windows), then move the outputs to their final names; on any error or cancel nothing is left
    behind. Beside a CPU model too, whose threads take every core: M2CD-MiT-b0's 4096² runs, alternating in
    one process, took less time with the writer beside the model than writing between batches, five times of
    five (bench/results.md). ``bands`` are on the grid the model reads on; ``progress``: the run's
    (``run_progress``), whose rows and finish parts this moves."""
    progress = progress or run_progress(setup, Progress())
    rows, finish = progress.part("rows"), progress.part("finish")
    writer = ChangeWriter(setup.grid, probability=probability, mask=mask, polygons=polygons,
                          threshold=setup.threshold, min_area=setup.options.min_area,
                          simplify=setup.options.simplify, polygon_layer=polygon_layer,
                          attributes={"pre": setup.paths[0].name, "post": setup.paths[1].name},
                          inputs=(*setup.paths, setup.options.aoi))

    def written(future, end: int) -> None:
        future.result()
        rows.update(end, setup.grid.height)

    try:
        with contextlib.ExitStack() as stack:
            if setup.model_grid is not None:  # made once the writer holds the folder: its scratch file is safe
                bands = stack.enter_context(contextlib.closing(on_output_grid(
                    bands, setup.model_grid, setup.reader(setup.grid), scratch_path(probability), Path(probability))))
            any_valid, in_flight = False, None  # the band in the writer thread, and the row it ends at
            with ThreadPoolExecutor(1, thread_name_prefix="geochange-write") as sink:
                for start, prob, valid in bands:
                    rows.check()
                    any_valid |= bool(valid.any())
                    if in_flight is not None:
                        written(*in_flight)
                    in_flight = sink.submit(writer.write_rows, start, prob, valid), start + len(prob)
                if in_flight is not None:
                    written(*in_flight)
        if not any_valid:
            where = f" inside the area of interest {setup.aoi.source}" if setup.aoi is not None else ""
            raise RasterError(f"no pixel is valid in both {setup.paths[0].name} and {setup.paths[1].name}{where} "
                              "(nodata everywhere" + (", or the area holds no pixel's centre)" if where else ")"))
        finish.check()
        writer.close(finish)
    except BaseException:
        writer.abort()
        raise
    return DetectResult(Path(probability), Path(mask), Path(polygons), writer.polygon_count,
                        writer.changed_area_m2, setup.grid)


def detect(pre_path: str | os.PathLike, post_path: str | os.PathLike, model: str | os.PathLike | ModelPackage, *,
           probability: str | os.PathLike, mask: str | os.PathLike, polygons: str | os.PathLike,
           polygon_layer: str = POLYGON_LAYER, readers: int | None = None, size_gdal_cache: bool = False,
           progress: Progress | None = None, **options) -> DetectResult:
    """Change probability, mask and polygons for a pre/post pair.

    Both dates are read on a common grid (``grid`` = ``pre`` or ``post``, or a given ``crs`` and
    ``resolution``) over the intersection of their footprints. ``polygon_layer``: the name of the polygons'
    layer, the only one of their file (written whole). ``options``: the fields of
    ``engine.options.DetectOptions`` (tile, overlap, batch, device, threshold, bands, scales...), each
    explained there. ``readers``: reader threads (default:
    ``default_readers``); ``size_gdal_cache``: see ``prepare``.
    Every output is written under a temporary name and renamed only when all succeeded.
    """
    progress = progress or Progress()
    check_outputs((probability, mask, polygons), (pre_path, post_path, options.get("aoi")))
    setup = prepare(pre_path, post_path, model, DetectOptions.of(options), readers=readers,
                    size_gdal_cache=size_gdal_cache, progress=progress)
    phases = run_progress(setup, progress)
    read = setup.reader()
    try:
        rows = stream_rows(setup.predictor, setup.plan, read, batch=setup.batch, progress=phases.part("windows"),
                           readers=setup.readers)
        with contextlib.closing(rows):  # its reader threads stopped before their datasets close
            return write_outputs(setup, rows, probability=probability, mask=mask, polygons=polygons,
                                 polygon_layer=polygon_layer, progress=phases)
    finally:
        read.close()
