"""One pair of ``geochange detect-many``, as a Dask task on a worker (``run_pair``), and its record.

The task runs ``detect`` into the pair's folder (the same atomic outputs), then writes the pair's record
(``done.json``) last: a re-run skips a pair whose record matches the model, its inputs as they are now and the
options, and whose outputs are on disk (``complete``; those changed since, such as polygons edited in QGIS, are
kept). A worker process keeps the model it loaded for its next pairs (and OpenVINO's last compiled model,
``exported.compiled_model``). The pair's own error (a bad file, no overlap) is its summary row's, not the task's.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from geochange.engine.aoi import split_layer
from geochange.engine.atomic import atomic_path
from geochange.engine.contracts import PAIR_DONE, PAIR_FAILED, output_names
from geochange.engine.errors import GeoChangeError, PackageError
from geochange.engine.progress import Progress

RECORD = "done.json"  # in a pair's folder, written last: the pair is complete
# Options that say where a pair runs, not what it gives: a re-run with others keeps complete pairs.
PLACEMENT = ("device", "threads")
# The summary's fields, in order (strings unless named here), then the footprint (the GeoPackage's
# geometry, the CSV's last column as WKT).
SUMMARY_FIELDS = ("name", "status", "error", "pre", "post", "polygons", "changed_area", "area_unit", "seconds",
                  "model_sha256")
NUMBERS = {"polygons": "integer", "changed_area": "real", "seconds": "real"}
OUTLINE_POINTS = 16  # points a side of a footprint, so that it bends as the projection to EPSG:4326 does


def _stamp(path: str | None) -> list | None:
    """What tells a file's version apart: its path, size and modification time (None: no such file)."""
    if path is None:
        return None
    try:
        status = os.stat(path)
    except OSError:
        return None
    return [str(path), status.st_size, status.st_mtime_ns]


def pair_outputs(job: dict) -> dict[str, str]:
    """``{kind: path}`` of a pair's outputs (``detect``'s keyword arguments)."""
    return {kind: str(Path(job["folder"]) / name) for kind, name in output_names(job["vector_format"]).items()}


def identity(job: dict) -> dict:
    """What a pair's outputs follow from: the model, the inputs as they are now, the options that change the
    result; as JSON reads it back from a record (tuples as lists)."""
    aoi = job["options"]["aoi"]
    return json.loads(json.dumps({
        "model_sha256": job["sha256"],
        "inputs": {"pre": _stamp(job["pre"]), "post": _stamp(job["post"]), "aoi": aoi and _stamp(split_layer(aoi)[0])},
        "options": {k: v for k, v in job["options"].items() if k not in PLACEMENT},
        "vector_format": job["vector_format"]}))


def complete(job: dict) -> tuple[dict, list[str]] | None:
    """Where the pair is complete (its record matches ``identity`` and every output it names is on disk): the
    record's row and the outputs changed since the record was written; else None. A changed output is kept, not
    made again: toggling editing in QGIS rewrites a GeoPackage, and an analyst's edits are not to be lost."""
    try:
        record = json.loads((Path(job["folder"]) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("row"), dict):  # not a record this engine wrote
        return None
    outputs = {kind: _stamp(path) for kind, path in pair_outputs(job).items()}
    written = record.get("outputs")
    if None in outputs.values() or not isinstance(written, dict) or written.keys() != outputs.keys() \
            or record.get("identity") != identity(job):
        return None
    return record.get("row"), [Path(outputs[kind][0]).name for kind in outputs if written[kind] != outputs[kind]]


def write_record(job: dict, before: dict, row: dict) -> None:
    """The pair's record, the last of its files: its ``identity`` taken ``before`` its run, its outputs' stamps
    and its row."""
    outputs = {kind: _stamp(path) for kind, path in pair_outputs(job).items()}
    with atomic_path(Path(job["folder"]) / RECORD) as temporary:
        temporary.write_text(json.dumps({"identity": before, "outputs": outputs, "row": row}, indent=1),
                             encoding="utf-8")


def pair_row(job: dict, status: str, **values) -> dict:
    """A pair's summary row (``SUMMARY_FIELDS`` and its ``footprint``), unset fields None."""
    return {**dict.fromkeys(SUMMARY_FIELDS), "footprint": None, "name": job["name"], "status": status,
            "pre": job["pre"], "post": job["post"], "model_sha256": job["sha256"], **values}


def _lonlat_outline(bounds, crs, progress: Progress) -> str | None:
    """The rectangle ``bounds`` of ``crs`` as a polygon in EPSG:4326 (WKT); None without a CRS (a pixel grid) or in a
    local CRS, tied to no place on Earth, or where it has no such outline (a geostationary view whose corners are off
    the Earth), which ``progress`` is told: a footprint is the summary's, never a reason to fail a pair."""
    import shapely
    from rasterio.warp import transform_geom

    from geochange.engine.grid import is_local

    if crs is None or is_local(crs):
        return None

    left, bottom, right, top = bounds
    outline = shapely.segmentize(shapely.box(left, bottom, right, top),
                                 max(right - left, top - bottom) / OUTLINE_POINTS)
    try:
        return shapely.geometry.shape(transform_geom(crs, "EPSG:4326", shapely.geometry.mapping(outline))).wkt
    except Exception as error:  # rasterio's CPLE errors, and the SystemError of a GDAL error it leaves unnamed
        progress.log(f"no footprint in the summary: the raster's outline does not project to longitude and latitude "
                     f"({type(error).__name__}: {error})")
        return None


def _input_outlines(job: dict, progress: Progress) -> str | None:
    """A failed pair's footprint: the outlines of those of its rasters that open (None: neither does)."""
    import shapely

    from geochange.engine.rasters import open_raster

    outlines = []
    for path in (job["pre"], job["post"]):
        try:
            with open_raster(path) as src:
                outlines.append(_lonlat_outline(src.bounds, src.crs, progress))
        except Exception:  # a raster that does not open: the pair's error says why, which this must not replace
            continue
    outlines = [shapely.from_wkt(wkt) for wkt in outlines if wkt]
    return shapely.union_all(outlines).wkt if outlines else None


_models: dict = {}  # (path, sha256) -> the package this worker process loaded, kept for its next pairs
_loading = threading.Lock()  # loaded once, however many of the worker's threads ask at once
_gpu = threading.Lock()  # a worker's pairs take its GPU one after the other (CUDA graphs are captured per run)


def _model(path: str, digest: str):
    from geochange.engine.package import load_model
    from geochange.engine.zoo import sha256

    with _loading:
        if (path, digest) not in _models:
            if not Path(path).is_file():
                raise PackageError(f"{path}: no such model file on the worker at {socket.gethostname()}")
            if sha256(Path(path)) != digest:
                raise PackageError(f"{path}: the model file on the worker at {socket.gethostname()} is not the one "
                                   "the run started with (another sha256): every worker must see the same file")
            _models.clear()
            _models[(path, digest)] = load_model(path)
        return _models[(path, digest)]


def _on_gpu(device: str):
    """A lock that keeps the worker's pairs off its GPU together (none on the CPU)."""
    import torch

    return _gpu if device != "cpu" and torch.cuda.is_available() else contextlib.nullcontext()


def _peak_rss() -> int | None:
    """This process's peak resident memory in bytes (None where the system does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def pair_threads(asked: int | None, shares: dict[str, int]) -> int | None:
    """PyTorch's threads for a pair: as ``asked`` (``--threads``); else, on a Dask worker, its share of its
    machine's cores (``shares``: by worker address, ``many.threads_by_worker``; for a worker that joined the
    cluster since, the cores shared among its own task threads); else PyTorch's own choice (None)."""
    if asked:
        return asked
    from dask.system import CPU_COUNT
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:  # not in a Dask task
        return None
    return shares.get(worker.address) or max(1, CPU_COUNT // worker.state.nthreads)


class _Log(Progress):
    """A pair's log lines (the grid, the precision, warnings), kept for the client, which shows them."""

    def __init__(self):
        self.lines = []

    def log(self, message: str) -> None:
        self.lines.append(message)


def run_pair(job: dict) -> dict:
    """One pair's detection, as a Dask task: ``job`` holds the pair, the model (path and sha256), the options
    and the pair's folder. Returns its summary row, its log and the worker's peak memory (``peak_bytes``). The pair's
    own error is its row's, not the task's: Dask runs a task again only where its worker died."""
    from geochange.engine.detect import detect
    from geochange.engine.process import configure_process

    started, folder, options = time.perf_counter(), Path(job["folder"]), dict(job["options"])
    progress = _Log()
    try:
        before = identity(job)  # an input changed during the run makes the next run redo the pair
        (folder / RECORD).unlink(missing_ok=True)  # the outputs may change from here on
        package = _model(job["model"], job["sha256"])
        configure_process(threads=pair_threads(options.pop("threads"), job.get("worker_threads", {})))
        with _on_gpu(options["device"]):
            result = detect(job["pre"], job["post"], package, size_gdal_cache=True, progress=progress,
                            **pair_outputs(job), **options)
        row = pair_row(job, PAIR_DONE, polygons=result.polygon_count, changed_area=result.changed_area_m2,
                   area_unit="m2" if result.grid.crs is not None else "px",
                   footprint=_lonlat_outline(result.grid.bounds, result.grid.crs, progress),
                   seconds=round(time.perf_counter() - started, 3))
        write_record(job, before, row)
    except Exception as error:  # the pair's failure, recorded; a bug's too, with its kind
        row = pair_row(job, PAIR_FAILED, error=str(error) if isinstance(error, GeoChangeError) else
                   f"{type(error).__name__}: {error}", footprint=_input_outlines(job, progress),
                   seconds=round(time.perf_counter() - started, 3))
    return {**row, "peak_bytes": _peak_rss(), "log": progress.lines}
