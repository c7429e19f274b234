"""Detection over a raster pair of any size, streamed: constant memory along the raster's height.

Reader threads (GDAL releases the GIL) fill a bounded queue of window batches; the model runs on
them in the main thread; blended rows collect in a rolling buffer one tile high; each band of rows
that no later window can touch is handed to a writer thread, which writes it and vectorises it.
Beside a CPU model, whose threads take every core, reading and writing run in the main thread
between batches instead (see ``default_readers``).
"""
from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from geochange.engine.errors import OptionError, RasterError
from geochange.engine.grid import Grid, GridReader, common_grid
from geochange.engine.inputs import model_channels
from geochange.engine.outputs import BLOCK, ChangeWriter
from geochange.engine.package import ModelPackage, RouterPackage, load_model
from geochange.engine.predict import Predictor, model_tta
from geochange.engine.process import bound_gdal_cache
from geochange.engine.progress import Progress
from geochange.engine.rasters import open_raster, select_bands, valid_mask
from geochange.engine.routing import RouterPredictor
from geochange.engine.windows import WindowPlan, blend_weights

# read(window) -> (pre raw, post raw, valid) arrays of one window; must be thread-safe.
WindowReader = Callable[[object], tuple]


class RowBlender:
    """Weighted sums of overlapping window predictions for the rows not yet released."""

    def __init__(self, plan: WindowPlan, top: int = 0):
        self.plan, self.top = plan, top
        shape = (min(plan.tile, plan.height), plan.width)
        self.weighted = np.zeros(shape, np.float32)
        self.weight = np.zeros(shape, np.float32)
        self.valid = np.zeros(shape, bool)

    def add(self, window, probability: np.ndarray | None, valid: np.ndarray) -> None:
        rows = slice(int(window.row_off) - self.top, int(window.row_off + window.height) - self.top)
        cols = slice(int(window.col_off), int(window.col_off + window.width))
        self.valid[rows, cols] |= valid
        if probability is not None:
            w = blend_weights(window, self.plan)
            self.weighted[rows, cols] += probability * w
            self.weight[rows, cols] += w

    def release(self, upto: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Rows ``top .. upto``: (first row, probability with NaN where nothing ran, valid)."""
        n, start = upto - self.top, self.top
        with np.errstate(invalid="ignore", divide="ignore"):
            prob = np.where(self.weight[:n] > 0, self.weighted[:n] / self.weight[:n], np.nan).astype(np.float32)
        valid = self.valid[:n].copy()
        for buffer in (self.weighted, self.weight, self.valid):
            keep = len(buffer) - n
            buffer[:keep] = buffer[n:].copy()
            buffer[keep:] = 0
        self.top = upto
        return start, prob, valid


class InlineExecutor(Executor):
    """Runs each task when it is submitted, in the submitting thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:  # delivered by result(), as a thread pool would
            future.set_exception(error)
        return future


def _on_cpu(predictor) -> bool:
    return getattr(predictor, "device", torch.device("cpu")).type == "cpu"


def default_readers(predictor) -> int:
    """Reader threads beside this model (0: read, and write, in the model's thread)."""
    # Up to four reader threads keep a GPU fed. Beside a CPU model none: its threads take every
    # core, and a reader holding one stalls each parallel region of the model until it lets go,
    # so the reading costs the model more than it would cost done between batches (figures in
    # bench/results.md).
    return 0 if _on_cpu(predictor) else min(4, os.cpu_count() or 1)


def io_executor(threads: int, name: str) -> Executor:
    return ThreadPoolExecutor(threads, thread_name_prefix=name) if threads else InlineExecutor()


def stream_rows(predictor: Callable, plan: WindowPlan, read: WindowReader, *, batch: int = 4,
                progress: Progress | None = None, readers: int | None = None, prefetch: int = 2,
                tile_rows: range | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(first row, probability, valid)`` for each tile row's band of finished rows, in order.

    Batches never span two tile rows, so a window's batch is the same whatever ``tile_rows`` (a
    subset of consecutive tile rows, for one rank of a distributed run) is given. Windows without a
    valid pixel are not run; ``predictor(pre, post, valid)`` gets the others' stacked arrays. At most
    ``readers + prefetch`` batches are read ahead; ``readers=0`` reads in this thread.
    """
    if batch < 1:
        raise OptionError(f"batch must be at least 1 window, not {batch}")
    progress = progress or Progress()
    readers = default_readers(predictor) if readers is None else readers
    row_starts, cols = plan.rows, plan.cols
    tile_rows = tile_rows if tile_rows is not None else range(len(row_starts))
    batches = [(i, windows[j:j + batch]) for i in tile_rows
               for windows in [plan.row_windows(i)] for j in range(0, len(windows), batch)]
    total, done = len(tile_rows) * len(cols), 0
    blender = RowBlender(plan, top=row_starts[tile_rows[0]]) if len(tile_rows) else None
    progress.update(0, total)

    def load(chunk):
        return [(window, *read(window)) for window in chunk]

    with io_executor(readers, "geochange-read") as pool:
        pending = deque(pool.submit(load, chunk) for _, chunk in batches[:readers + prefetch])
        queued = len(pending)
        try:
            for index, (tile_row, _) in enumerate(batches):
                progress.check()
                items = pending.popleft().result()
                if queued < len(batches):
                    pending.append(pool.submit(load, batches[queued][1]))
                    queued += 1
                run = [item for item in items if np.any(item[3])]
                probs = iter(predictor(*(np.stack([i[k] for i in run]) for k in (1, 2, 3)))) if run else None
                for window, _, _, valid in items:
                    blender.add(window, next(probs) if np.any(valid) else None, valid)
                done += len(items)
                progress.update(done, total)
                if index + 1 == len(batches) or batches[index + 1][0] != tile_row:
                    # Tile row complete: rows above the next tile row are final.
                    end = row_starts[tile_row + 1] if tile_row + 1 < len(row_starts) else plan.height
                    yield blender.release(end)
        finally:
            for future in pending:
                future.cancel()


def predict_plan(predictor: Callable, plan: WindowPlan, read: WindowReader, **options) -> np.ndarray:
    """The whole blended probability of a plan in memory (small rasters, dataset images)."""
    return np.concatenate([prob for _, prob, _ in stream_rows(predictor, plan, read, **options)])


class PairReader:
    """Thread-safe window reader of both dates on a common grid: each thread opens its own datasets."""

    def __init__(self, pre_path, post_path, grid: Grid, pre_bands: list[int], post_bands: list[int]):
        self.paths, self.grid, self.bands = (pre_path, post_path), grid, (pre_bands, post_bands)
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
            ok &= valid_mask(reader, window, data, bands)
            out.append(data)
        if ok.all():
            return out[0], out[1], ok
        # Invalid pixels are zeroed so that NaN cannot leak into the model through convolutions.
        return np.where(ok, out[0], 0), np.where(ok, out[1], 0), ok

    def close(self) -> None:
        for item in self._opened:
            item.close()


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
    grid: Grid
    bands: tuple[list[int], list[int]]
    plan: WindowPlan
    threshold: float
    paths: tuple[Path, Path]
    readers: int  # reader threads (0: read in the model's thread)
    batch: int  # windows per model call, lowered to fit the machine's memory

    def reader(self) -> PairReader:
        return PairReader(*self.paths, self.grid, *self.bands)


def blocks_in_use(width: int, tile: int, dates, readers: int = 1) -> int:
    """Bytes of GDAL blocks a run over a grid this wide keeps in use at once: each date's blocks under
    a tile row of windows (which straddles a block row), once per reader thread (each has its own
    datasets), and the outputs' under a band of rows (two block rows of float32 and uint8, a third
    more for their overviews). A warped date is counted at the grid's resolution: an estimate, which
    the cache's factor of two and its 256 MB floor absorb."""
    inputs = sum((tile + src.block_shapes[0][0]) * width * sum(np.dtype(src.dtypes[b - 1]).itemsize for b in bands)
                 for src, bands in dates)
    return readers * inputs + 2 * BLOCK * width * (4 + 1) * 4 // 3


def check_threshold(threshold: float | None) -> float | None:
    """A change threshold given by the user (None: the package's) is a probability."""
    if threshold is not None and not 0 <= threshold <= 1:
        raise OptionError(f"threshold must be in [0, 1], not {threshold}")
    return threshold


def physical_memory() -> int | None:
    """The machine's memory in bytes; None where the system does not say (no ``sysconf`` on Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


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


def prepare(pre_path, post_path, model, *, tile: int | None = None, overlap: int = 64, batch: int = 4,
            device: str = "auto", precision: str = "bf16", tta: bool = False, threshold: float | None = None,
            pre_bands: list[int] | None = None, post_bands: list[int] | None = None, grid: str = "pre",
            crs: str | None = None, resolution: float | None = None, sar_db: bool = False,
            pre_scale: float | None = None, post_scale: float | None = None, readers: int | None = None,
            size_gdal_cache: bool = False, progress: Progress | None = None) -> DetectSetup:
    """Load the model, check both rasters against it and find their common grid (see ``detect``).
    ``size_gdal_cache``: bound GDAL's block cache, process-wide, to this run's (``process.bound_gdal_cache``);
    for the programs that own their process (the command line, the worker)."""
    progress = progress or Progress()
    check_threshold(threshold)
    package = model if isinstance(model, (ModelPackage, RouterPackage)) else load_model(model)

    first = package.original if isinstance(package, RouterPackage) else package
    if tile is None:  # the window the model was trained on
        tile = first.tile
        progress.log(f"windows of {tile} px: the model's tile" + ("" if "tile" in first.manifest else
                                                                   " (none recorded: the default)"))
    tta = model_tta(first.manifest) if tta else None
    if tta:
        progress.log(f"test-time augmentation: scales {tta['scales']}" + " x left-right flip" * tta["flip"])

    def predictor_of(member: ModelPackage) -> Predictor:
        return Predictor(member, device, precision=precision, tta=tta, sar_db=sar_db,
                         scales={"pre": pre_scale, "post": post_scale}, log=progress.log)

    if isinstance(package, RouterPackage):
        predictor = RouterPredictor(package, predictor_of)
        inputs = package.original.manifest["inputs"]
        progress.log(f"O-P routing: original model and {len(package.teachers)} teachers, CAR thresholds "
                     f"{package.thresholds}")
    else:
        predictor, inputs = predictor_of(package), package.manifest["inputs"]
    with open_raster(pre_path) as pre, open_raster(post_path) as post:
        common = common_grid(pre, post, on=grid, crs=crs, resolution=resolution, warn=progress.log)
        bands = (select_bands(pre, inputs["pre"], "pre", pre_bands),
                 select_bands(post, inputs["post"], "post", post_bands))
        readers = default_readers(predictor) if readers is None else readers
        if size_gdal_cache:
            bound_gdal_cache(blocks_in_use(common.width, tile, [(pre, bands[0]), (post, bands[1])], max(1, readers)))
    plan = WindowPlan(common.height, common.width, tile, overlap)
    batch = fit_batch(plan, batch, model_channels(inputs["pre"]) + model_channels(inputs["post"]), progress.log)
    threads = torch.get_num_threads()
    on = f"cpu, {threads} thread{'s' * (threads != 1)}" if _on_cpu(predictor) else predictor.device
    progress.log(f"{common.width}x{common.height} px in {common.crs}: {len(plan)} windows of "
                 f"{min(tile, common.height)}x{min(tile, common.width)} px on {on}")
    return DetectSetup(predictor, common, bands, plan, package.threshold if threshold is None else float(threshold),
                       (Path(pre_path), Path(post_path)), readers, batch)


def write_outputs(setup: DetectSetup, bands: Iterator[tuple[int, np.ndarray, np.ndarray]], *, probability, mask,
                  polygons, min_area: float = 0.0, simplify: float = 0.0,
                  progress: Progress | None = None) -> DetectResult:
    """Write finished row bands as they come (one band in flight in a writer thread when the run has
    reader threads, else in this thread), then move the outputs to their final names; on any error or
    cancel nothing is left behind."""
    progress = progress or Progress()
    writer = ChangeWriter(setup.grid, probability=probability, mask=mask, polygons=polygons,
                          threshold=setup.threshold, min_area=min_area, simplify=simplify,
                          attributes={"pre": setup.paths[0].name, "post": setup.paths[1].name})
    try:
        any_valid, in_flight = False, None
        with io_executor(int(setup.readers > 0), "geochange-write") as sink:
            for start, prob, valid in bands:
                any_valid |= bool(valid.any())
                if in_flight is not None:
                    in_flight.result()
                in_flight = sink.submit(writer.write_rows, start, prob, valid)
            if in_flight is not None:
                in_flight.result()
        if not any_valid:
            raise RasterError(f"no pixel is valid in both {setup.paths[0].name} and {setup.paths[1].name} "
                              "(nodata everywhere)")
        progress.check()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return DetectResult(Path(probability), Path(mask), Path(polygons), writer.polygon_count,
                        writer.changed_area_m2, setup.grid)


def detect(pre_path: str | os.PathLike, post_path: str | os.PathLike, model: str | os.PathLike | ModelPackage, *,
           probability: str | os.PathLike, mask: str | os.PathLike, polygons: str | os.PathLike,
           batch: int = 4, min_area: float = 0.0, simplify: float = 0.0, readers: int | None = None,
           progress: Progress | None = None, **options) -> DetectResult:
    """Change probability, mask and polygons for a pre/post pair.

    Both dates are read on a common grid (``grid`` = ``pre`` or ``post``, or a given ``crs`` and
    ``resolution``) over the intersection of their footprints. Options (see ``prepare``): ``tile``
    (default: the model's), ``overlap``, ``device``, ``precision``, ``tta``, ``size_gdal_cache``; ``threshold``
    (default: the package's); ``pre_bands``/``post_bands``, 1-based band indexes in the order the model wants;
    ``pre_scale``/``post_scale``, the raw value meaning 1.0 (default: by data type); ``sar_db``, float
    SAR input in dB. ``min_area`` is in m2, ``simplify`` in map units. ``readers``: reader threads, and
    a writer thread unless 0 (default: ``default_readers``).
    Every output is written under a temporary name and renamed only when all succeeded.
    """
    progress = progress or Progress()
    setup = prepare(pre_path, post_path, model, batch=batch, progress=progress, readers=readers, **options)
    read = setup.reader()
    try:
        rows = stream_rows(setup.predictor, setup.plan, read, batch=setup.batch, progress=progress,
                           readers=setup.readers)
        return write_outputs(setup, rows, probability=probability, mask=mask, polygons=polygons,
                             min_area=min_area, simplify=simplify, progress=progress)
    finally:
        read.close()
