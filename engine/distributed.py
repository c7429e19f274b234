"""Detection split over the ranks of ``torchrun`` (one process per GPU, or per CPU share).

Each rank takes a contiguous run of tile rows, plus the tile rows above it whose windows reach into
its rows (their blend weights count), and writes its finished rows to a part file (float32, NaN where
invalid). Rank 0 then feeds the parts, band by band, to the same writer a single process uses, so
the rasters and polygons are those of a one-process run. Ranks coordinate over gloo (CPU-only
collectives: a barrier and one broadcast), whatever device runs the model.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from geochange.engine.atomic import check_outputs, new_token
from geochange.engine.contracts import POLYGON_LAYER
from geochange.engine.detect import DetectResult, prepare, run_progress, write_outputs
from geochange.engine.errors import OutputError
from geochange.engine.options import DetectOptions
from geochange.engine.progress import Progress
from geochange.engine.stream import stream_rows


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank_tile_rows(count: int, world: int, rank: int) -> range:
    """The contiguous tile rows a rank finishes: an even split, the first ranks taking one more."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def _halo_start(row_starts: list[int], tile_height: int, first: int) -> int:
    """The first tile row whose windows reach the rows of tile row ``first``."""
    i = first
    while i > 0 and row_starts[i - 1] + tile_height > row_starts[first]:
        i -= 1
    return i


def _part_path(parts: Path, rank: int) -> Path:
    return parts / f"rank{rank:04d}.npy"


def distributed_detect(pre_path, post_path, model, *, probability, mask, polygons, polygon_layer: str = POLYGON_LAYER,
                       readers: int | None = None, size_gdal_cache: bool = False, progress: Progress | None = None,
                       **options) -> DetectResult | None:
    """``detect`` over all ranks (same arguments); returns the result on rank 0, None on the others.
    ``device`` auto is each rank's GPU (``LOCAL_RANK``) where there are GPUs."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    options = DetectOptions.of(options)
    if options.device == "auto" and torch.cuda.is_available():
        options = replace(options, device=f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}")
    progress = (progress or Progress()) if rank == 0 else Progress()
    try:
        check_outputs((probability, mask, polygons), (pre_path, post_path, options.aoi))  # on every rank: all stop
        setup = prepare(pre_path, post_path, model, options, readers=readers, size_gdal_cache=size_gdal_cache,
                        progress=progress)
        phases = run_progress(setup, progress)  # rank 0's windows stand for every rank's
        plan, row_starts = setup.plan, setup.plan.rows
        mine = rank_tile_rows(len(row_starts), world, rank)
        token = [new_token() if rank == 0 else None]
        dist.broadcast_object_list(token, src=0)
        # Not named as the outputs' temporaries: rank 0's writer would take them for a dead run's.
        parts = Path(probability).parent / f".{Path(probability).stem}.{token[0]}.parts"
        parts.mkdir(parents=True, exist_ok=True)
        try:
            if len(mine):
                first_row = row_starts[mine.start]
                last_row = row_starts[mine.stop] if mine.stop < len(row_starts) else plan.height
                part = np.lib.format.open_memmap(_part_path(parts, rank), mode="w+", dtype=np.float32,
                                                 shape=(last_row - first_row, plan.width))
                read = setup.reader()
                try:
                    halo = _halo_start(row_starts, min(plan.tile, plan.height), mine.start)
                    for start, prob, valid in stream_rows(setup.predictor, plan, read, batch=setup.batch,
                                                          progress=phases.part("windows"), readers=setup.readers,
                                                          tile_rows=range(halo, mine.stop)):
                        if start >= first_row:
                            part[start - first_row:start - first_row + len(prob)] = np.where(valid, prob, np.nan)
                finally:
                    read.close()
                part.flush()
                del part
            dist.barrier()
            if rank != 0:
                dist.barrier()  # rank 0 removes the parts after writing
                return None
            result = write_outputs(setup, _bands_from_parts(parts, row_starts, plan.height, world),
                                   probability=probability, mask=mask, polygons=polygons,
                                   polygon_layer=polygon_layer, progress=phases)
            dist.barrier()
            return result
        finally:
            if rank == 0:
                shutil.rmtree(parts, ignore_errors=True)
    finally:
        dist.destroy_process_group()


def _bands_from_parts(parts: Path, row_starts: list[int], height: int, world: int):
    """The rows of every rank's part, cut at the tile rows as a single process releases them."""
    ends = row_starts[1:] + [height]
    for rank in range(world):
        rows = rank_tile_rows(len(row_starts), world, rank)
        if not len(rows):
            continue
        path = _part_path(parts, rank)
        if not path.exists():  # e.g. ranks on nodes that do not share the output folder
            raise OutputError(f"{path}: rank {rank}'s rows are not there; every rank must write into the output "
                              "folder rank 0 reads (a folder all nodes share)")
        part = np.load(path, mmap_mode="r")
        offset = row_starts[rows.start]
        for i in rows:
            prob = np.array(part[row_starts[i] - offset:ends[i] - offset])
            yield row_starts[i], prob, np.isfinite(prob)
