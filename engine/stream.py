"""The streaming loop: window batches read, run through the model and blended, tile row by tile row.

Reader threads (GDAL releases the GIL) fill a bounded queue of window batches; the model runs on
them in the main thread; blended rows collect in a rolling buffer one tile high (``blending``), and
each band of rows that no later window can touch is yielded to the caller (``detect`` writes it, in a
writer thread).
Beside a CPU model, whose threads take every core, reading runs in the main thread between batches
instead (see ``default_readers``).
"""
from __future__ import annotations

import functools
import os
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch

from geochange.engine.blending import RowBlender
from geochange.engine.errors import OptionError
from geochange.engine.progress import Progress
from geochange.engine.windows import WindowPlan

# read(window) -> (pre raw, post raw, valid) arrays of one window; must be thread-safe.
WindowReader = Callable[[object], tuple]
# A window's reading, as a share of the window in the progress: about 10 ms of both dates' pixels against
# 370 ms of model on this project's CPU for a 512 px window (bench/results.md); the rest is the model's.
READ_SHARE = 0.03


class InlineExecutor(Executor):
    """Runs each task when it is submitted, in the submitting thread."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:  # delivered by result(), as a thread pool would
            future.set_exception(error)
        return future


def on_cpu(predictor) -> bool:
    return getattr(predictor, "device", torch.device("cpu")).type == "cpu"


def default_readers(predictor) -> int:
    """Reader threads beside this model (0: read in the model's thread)."""
    # Up to four reader threads keep a GPU fed. Beside a CPU model none: its threads take every
    # core, and a reader holding one stalls each parallel region of the model until it lets go,
    # so the reading costs the model more than it would cost done between batches (figures in
    # bench/results.md).
    return 0 if on_cpu(predictor) else min(4, os.cpu_count() or 1)


def io_executor(threads: int, name: str) -> Executor:
    return ThreadPoolExecutor(threads, thread_name_prefix=name) if threads else InlineExecutor()


def stream_rows(predictor: Callable, plan: WindowPlan, read: WindowReader, *, batch: int = 4,
                progress: Progress | None = None, readers: int | None = None, prefetch: int = 2,
                tile_rows: range | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(first row, probability, valid)`` for each tile row's band of finished rows, in order.

    Batches never span two tile rows, so a window's batch is the same whatever ``tile_rows`` (a
    subset of consecutive tile rows, for one rank of a distributed run) is given. Windows without a
    valid pixel are not run; ``predictor(pre, post, valid)`` gets the others' stacked arrays. Reader
    threads read up to ``readers + prefetch`` batches ahead; ``readers=0`` reads each batch in this
    thread when its turn comes. ``progress`` counts windows, each one as it is read (``READ_SHARE`` of a
    window; reader threads' windows when their batch comes) and as it is blended.
    """
    if batch < 1:
        raise OptionError(f"batch must be at least 1 window, not {batch}")
    progress = progress or Progress()
    readers = default_readers(predictor) if readers is None else readers
    row_starts, cols = plan.rows, plan.cols
    tile_rows = tile_rows if tile_rows is not None else range(len(row_starts))
    batches = [(i, windows[j:j + batch]) for i in tile_rows
               for windows in [plan.row_windows(i)] for j in range(0, len(windows), batch)]
    total, counts = len(tile_rows) * len(cols), {"read": 0, "blended": 0}
    blender = RowBlender(plan, top=row_starts[tile_rows[0]]) if len(tile_rows) else None
    progress.update(0, total)

    def count(step: str) -> None:  # in this thread only
        counts[step] += 1
        progress.update(counts["blended"] + (counts["read"] - counts["blended"]) * READ_SHARE, total)

    def load(chunk, on_read):
        items = []
        for window in chunk:
            items.append((window, *read(window)))
            on_read()
        return items

    ahead = readers + prefetch if readers else 0  # batches being read beside the one the model runs
    on_read = (lambda: None) if readers else functools.partial(count, "read")
    with io_executor(readers, "geochange-read") as pool:
        pending, queued = deque(), 0
        try:
            for index, (tile_row, _) in enumerate(batches):
                progress.check()
                while queued < min(index + 1 + ahead, len(batches)):
                    pending.append(pool.submit(load, batches[queued][1], on_read))
                    queued += 1
                items = pending.popleft().result()
                if readers:  # read in threads: counted here, in this thread
                    for _ in items:
                        count("read")
                run = [item for item in items if np.any(item[3])]
                probs = iter(predictor(*(np.stack([i[k] for i in run]) for k in (1, 2, 3)))) if run else None
                for window, _, _, valid in items:
                    blender.add(window, next(probs) if np.any(valid) else None, valid)
                    count("blended")
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
