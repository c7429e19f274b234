"""Detection over many pairs on a Dask cluster (``geochange detect-many``).

Each pair is one task (``engine.pair_task``) that runs ``detect`` into ``OUT/<name>/`` and records it; a
re-run skips the pairs that are complete. A pair's own error (a bad file, no overlap) is recorded in its
row and the others go on; a worker that dies has its pairs run again elsewhere (Dask), and its temporaries
are removed by the run that takes its pair over. The summary of every pair (``summary.gpkg``,
``summary.csv``) is rewritten, atomically, as pairs finish (``Summary``) and when the run ends.

Without a scheduler address the pairs run on this machine (``local_layout``, ``_local_client``); with one,
on that scheduler's cluster, whose workers must import this engine (``geochange`` installed) and see the
same paths: the inputs, the model and the output folder.
"""
from __future__ import annotations

import collections
import contextlib
import csv
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from geochange.engine.aoi import absolute_layer
from geochange.engine.atomic import AtomicOutputs, check_outputs, folder_lock, remove_left_temporaries
from geochange.engine.contracts import PAIR_DONE, PAIR_FAILED, PAIR_PENDING, PAIR_SKIPPED, SUMMARY_FILES, SUMMARY_LAYER
from geochange.engine.errors import Cancelled, GeoChangeError, OptionError, gdal_write_errors, output_error
from geochange.engine.options import DETECT, DetectOptions, names
from geochange.engine.pair_task import NUMBERS, SUMMARY_FIELDS, complete, pair_outputs, pair_row, run_pair
from geochange.engine.pairs import Pair, checked
from geochange.engine.progress import Progress

SUMMARY_GPKG, SUMMARY_CSV = SUMMARY_FILES
# A local worker's memory limit is the machine's available memory shared among the workers, whose number
# the first pair's measured peak bounds: peak x HEADROOM each. Why 1.25: the peak follows the tile and
# batch, hardly the raster (make bench: TinyCD's peak RSS at 16384² was 0.96 to 1.08 x that at 4096²,
# bench/results.md), and the pair measured is the widest that succeeds (the widest fill the largest batches).
HEADROOM = 1.25
# Dask's settings for the local cluster. A worker's memory is its model's and its pair's, nothing Dask
# could spill, and glibc keeps freed memory (engine/process.py): a worker paused at 80 % would never
# resume, so only the terminate threshold (95 % of the limit: Dask restarts the worker and its pair runs
# again) stays. Pairs take seconds to hours: each worker holds only the pair it runs, so a free worker
# takes the next instead of waiting behind a busy one.
LOCAL_CONFIG = {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False,
                "distributed.worker.memory.pause": False, "distributed.scheduler.worker-saturation": 1.0}
ENGINE_ROOT = Path(__file__).resolve().parents[1]


# --- The summary -----------------------------------------------------------------------------------------

def write_summary(rows: list[dict], out: Path) -> None:
    """``summary.gpkg`` (layer ``pairs``: each pair's footprint in EPSG:4326 and ``SUMMARY_FIELDS``) and
    ``summary.csv`` (the same, the footprint as WKT), renamed together when both are written."""
    from osgeo import ogr, osr

    kinds = {"integer": ogr.OFTInteger64, "real": ogr.OFTReal}
    with AtomicOutputs() as outputs:
        gpkg, table = outputs.path(out / SUMMARY_GPKG), outputs.path(out / SUMMARY_CSV)
        with gdal_write_errors(out / SUMMARY_GPKG):
            srs = osr.SpatialReference()
            srs.ImportFromEPSG(4326)
            srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
            source = ogr.GetDriverByName("GPKG").CreateDataSource(str(gpkg))
            if source is None:
                raise output_error(out / SUMMARY_GPKG, "cannot create a GeoPackage")
            try:
                layer = source.CreateLayer(SUMMARY_LAYER, srs, ogr.wkbMultiPolygon)
                for field in SUMMARY_FIELDS:
                    layer.CreateField(ogr.FieldDefn(field, kinds.get(NUMBERS.get(field), ogr.OFTString)))
                layer.StartTransaction()
                for row in rows:
                    feature = ogr.Feature(layer.GetLayerDefn())
                    for field in SUMMARY_FIELDS:
                        if row[field] is not None:
                            feature.SetField(field, row[field])
                    if row["footprint"]:
                        feature.SetGeometry(ogr.ForceToMultiPolygon(ogr.CreateGeometryFromWkt(row["footprint"])))
                    layer.CreateFeature(feature)
                layer.CommitTransaction()
            finally:
                # Flushed and closed here, where a failure is caught, also after one (GDAL's exceptions on): not
                # when the error leaving with this frame is dropped, which would print the failing flush then.
                layer = source = None
        try:
            with open(table, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow([*SUMMARY_FIELDS, "footprint"])
                writer.writerows([row[field] for field in (*SUMMARY_FIELDS, "footprint")] for row in rows)
        except OSError as error:
            raise output_error(out / SUMMARY_CSV, error.strerror or str(error)) from None


class Summary:
    """A run's summary files, rewritten as its pairs end, but not before ``SPACING`` times the last write's
    duration has passed since it: rewritten after every pair, a run of 5,000 pairs spent about 12 minutes on
    its summary (58 us a row). A write put off is made when that time comes (a timer thread), so no row stays
    behind while the next pair runs. ``write(rows)`` writes at once (the run's start and end)."""

    SPACING = 10

    def __init__(self, out: Path):
        self.out, self.writes = out, 0
        self._next, self._rows, self._timer = 0.0, None, None
        self._lock = threading.Lock()

    def write(self, rows: list[dict], *, now: bool = True) -> None:
        with self._lock:
            self._rows = rows
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            wait = self._next - time.monotonic()
            if now or wait <= 0:
                self._write()
            else:
                self._timer = threading.Timer(wait, self._due, args=(rows,))
                self._timer.daemon = True
                self._timer.start()

    def _due(self, rows: list[dict]) -> None:
        with self._lock:
            if self._rows is rows:  # not written since, nor put off again
                with contextlib.suppress(GeoChangeError):  # the next write, or the last, raises it
                    self._write()

    def _write(self) -> None:
        started = time.monotonic()
        write_summary(self._rows, self.out)
        ended = time.monotonic()
        self.writes, self._next, self._rows = self.writes + 1, ended + self.SPACING * (ended - started), None


# --- The local cluster -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """A local cluster: ``workers`` processes of one Dask thread each (a pair at a time), each pair's
    PyTorch on ``threads`` threads; ``gpus``: worker i's GPU (none: the CPU)."""

    workers: int
    threads: int
    gpus: tuple[int, ...] = ()


def local_layout(cores: int, gpus: list[int], *, workers: int | None = None, threads: int | None = None,
                 peak: int | None = None, memory: int | None = None, pairs: int | None = None,
                 warn=lambda message: None) -> Layout:
    """The local cluster for ``cores`` cores and ``gpus``: one worker per GPU, else one per core, and no more
    than the ``pairs`` to run; threads sharing the cores, never more threads in all than cores. Where a
    worker's ``peak`` memory is measured, no more workers than ``memory`` holds at that peak plus ``HEADROOM``
    (unless ``workers`` is given: then ``warn`` says where they may not fit). ``workers``/``threads`` as asked
    (refused where they would oversubscribe the machine)."""
    if workers is not None and workers < 1:
        raise OptionError(f"--workers must be at least 1, not {workers}")
    if gpus:
        count = workers or len(gpus)
        if count > len(gpus):
            raise OptionError(f"--workers {count}: one GPU a worker, and this machine has {len(gpus)}")
    else:
        count = workers or max(1, cores // (threads or 1))
    fit = max(1, int(memory // (peak * HEADROOM))) if peak and memory else count
    if workers is None:
        count = min(count, fit)
    count = min(count, pairs or count)
    if count > fit:
        warn(f"--workers {workers}: a worker's measured peak memory ({peak / 2**30:.2f} GiB) with a quarter to "
             f"spare fits {fit} time(s) in the {memory / 2**30:.1f} GiB available; a worker out of its share is "
             "restarted and its pair run again, then failed")
    threads = threads or max(1, cores // count)
    if count * threads > cores:
        raise OptionError(f"{count} worker(s) x --threads {threads} would take more than this machine's {cores} "
                          "cores: lower --workers or --threads")
    return Layout(count, threads, tuple(gpus[:count]))


def _gpus(device: str) -> list[int]:
    """The GPUs the run's ``device`` asks for on this machine (empty: the CPU)."""
    if device == "cpu":
        return []
    from geochange.engine.predictor import resolve_device

    chosen = resolve_device(device)  # checked: a GPU asked for and absent is refused here
    if chosen.type == "cpu":
        return []
    import torch

    return [chosen.index] if chosen.index is not None else list(range(torch.cuda.device_count()))


def _check_workers_import_this_engine() -> None:
    """The local workers are new processes, started with this process's ``sys.path``, that import the engine
    as the package ``geochange``: it must be this copy (the QGIS worker loads the plugin's folder by its path,
    which a new process does not inherit: its parent folder goes on ``sys.path``, last, for them)."""
    if ENGINE_ROOT.name == "geochange" and str(ENGINE_ROOT.parent) not in sys.path:
        sys.path.append(str(ENGINE_ROOT.parent))
    try:
        # sys.path from the arguments, before any import: -c puts the current folder first, whose json.py would run.
        found = subprocess.run([sys.executable, "-c", "import sys; sys.path[:] = sys.argv[1:]; import geochange; "
                                "print(geochange.__file__)", *sys.path], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise GeoChangeError(f"detect-many: {sys.executable} did not import the engine within 120 s") from None
    where = Path(found.stdout.strip()).resolve().parent if found.returncode == 0 else None
    if where != ENGINE_ROOT:
        raise GeoChangeError(f"detect-many's worker processes import the package geochange, which {sys.executable} "
                             f"finds {'at ' + str(where) if where else 'nowhere'}, not at {ENGINE_ROOT}: install "
                             f"this copy there ({sys.executable} -m pip install --no-deps -e {ENGINE_ROOT})")


@contextlib.contextmanager
def _local_client(layout: Layout, memory_limit: int):
    """A Dask client of a cluster of ``layout`` on this machine (127.0.0.1), each worker limited to
    ``memory_limit`` bytes and seeing only its own GPU. A ``SpecCluster``, LocalCluster's base: LocalCluster
    gives every worker the same environment, and each needs its own ``CUDA_VISIBLE_DEVICES``."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # device numbers as this process sees them
    ids = visible.split(",") if visible else None

    def worker(gpu: int | None) -> dict:
        env = {} if gpu is None else {"CUDA_VISIBLE_DEVICES": ids[gpu] if ids else str(gpu)}
        return {"cls": Nanny, "options": {"nthreads": 1, "memory_limit": memory_limit, "host": "127.0.0.1",
                                          "env": env, "silence_logs": logging.ERROR, "dashboard": False}}

    gpus = layout.gpus or (None,) * layout.workers
    # No dashboard (it needs bokeh); Dask's HTTP endpoints on a free port, not on 8787, which may be taken.
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard": False,
                                               "dashboard_address": "127.0.0.1:0"}}
    with SpecCluster(scheduler=scheduler,
                     workers={i: worker(gpu) for i, gpu in enumerate(gpus)}, silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        yield client


# --- The run ---------------------------------------------------------------------------------------------

def make_job(pair: Pair, model: Path, digest: str, out: Path, options: DetectOptions, vector_format: str) -> dict:
    """What a worker needs to run ``pair`` (``run_pair``), every path absolute: the model and its sha256, the
    pair's folder under ``out``, the options (the pair's area of interest, else the run's)."""
    aoi = pair.aoi or options.aoi
    if aoi:  # FILE or FILE|layername=NAME
        aoi = absolute_layer(aoi, os.getcwd())
    return {"name": pair.name, "pre": os.path.abspath(pair.pre), "post": os.path.abspath(pair.post),
            "folder": str(out / pair.name), "model": str(model), "sha256": digest, "vector_format": vector_format,
            "options": {**{name: getattr(options, name) for name in names(DETECT)}, "aoi": aoi}}


def _outcome(future, job: dict) -> dict:
    """A finished task's row; a task that itself failed (its workers died: out of memory, a crash; a worker
    that cannot import the engine) is its pair's failure."""
    try:
        return future.result()
    except Cancelled:  # this process was asked to stop while it waited: the run stops, the pair is no failure
        raise
    except Exception as error:
        return pair_row(job, PAIR_FAILED, error=f"the task failed on the cluster: {type(error).__name__}: {error}")


def _submit(client, job: dict, threads: int | None = None):
    options = job["options"] if threads is None else {**job["options"], "threads": threads}
    return client.submit(run_pair, {**job, "options": options}, key=f"geochange-{job['name']}-{uuid.uuid4().hex}",
                         pure=False)


def _run_all(client, jobs: list[dict], record, threads: int | None = None) -> None:
    """Every job on the client's cluster, each row recorded as its task ends; on an error or a cancel here,
    the tasks not yet finished are cancelled."""
    from distributed import as_completed

    futures = {_submit(client, job, threads): job for job in jobs}
    try:
        for future in as_completed(futures):
            record(_outcome(future, futures[future]))
    finally:
        client.cancel(list(futures))


def _widest_first(jobs: list[dict]) -> list[dict]:
    """The jobs by their pre raster's width, widest first (those that do not open last)."""
    from geochange.engine.rasters import open_raster

    def width(job):
        try:
            with open_raster(job["pre"]) as src:
                return src.width
        except GeoChangeError:
            return 0
    return sorted(jobs, key=width, reverse=True)


def _on_this_machine(jobs: list[dict], record, options: DetectOptions, workers: int | None, progress) -> None:
    """The jobs on a local cluster. Where it would have several workers, one worker first runs the widest
    pairs until one succeeds, whose peak memory sets how many workers the memory holds (``local_layout``);
    then the cluster of that many runs the rest."""
    import dask
    import psutil
    from dask.system import CPU_COUNT  # the CPU affinity's cores, within a container's quota

    _check_workers_import_this_engine()
    from distributed.system import MEMORY_LIMIT  # the machine's, or its container's (cgroup) where lower

    cores, gpus = CPU_COUNT, _gpus(options.device)
    memory = min(psutil.virtual_memory().available, MEMORY_LIMIT)
    widest = local_layout(cores, gpus, workers=workers, threads=options.threads, pairs=len(jobs))
    device = "cuda" if gpus else options.device  # a worker sees its GPU only, as cuda
    jobs = [{**job, "options": {**job["options"], "device": device}} for job in _widest_first(jobs)]
    peak = None
    with dask.config.set(LOCAL_CONFIG):
        if widest.workers > 1:
            alone = Layout(1, options.threads or (widest.threads if gpus else cores), widest.gpus[:1])
            progress.log(f"measuring a worker's memory on the widest pair: 1 worker x {alone.threads} thread(s)")
            with _local_client(alone, memory) as client:
                done = False  # where the system does not say a process's peak (Windows), none bounds the workers
                while jobs and not done:
                    row = _outcome(_submit(client, jobs[0], alone.threads), jobs.pop(0))
                    record(row)
                    done = row["status"] == PAIR_DONE
                    peak = row.get("peak_bytes") if done else None
        if not jobs:
            return
        layout = local_layout(cores, gpus, workers=workers, threads=options.threads, peak=peak, memory=memory,
                              pairs=len(jobs), warn=lambda message: progress.log(f"warning: {message}"))
        limit = memory // layout.workers
        progress.log(f"local Dask cluster: {layout.workers} worker(s) x {layout.threads} thread(s)"
                     + (f" on GPU(s) {', '.join(map(str, layout.gpus))}" if layout.gpus else "")
                     + f", {limit / 2**30:.1f} GiB of memory each"
                     + (f" (a worker's measured peak: {peak / 2**30:.2f} GiB)" if peak else ""))
        with _local_client(layout, limit) as client:
            _run_all(client, jobs, record, layout.threads)


def _cpu_count() -> int:
    """A worker's machine's cores as Dask counts them (affinity, a container's quota): run there by the client."""
    from dask.system import CPU_COUNT

    return CPU_COUNT


def threads_by_worker(client) -> dict[str, int]:
    """PyTorch's threads for each worker's pairs where ``--threads`` is not given: its machine's cores (as Dask
    counts them) shared among the task threads of every worker there. A nanny starts its worker with
    ``OMP_NUM_THREADS=1``, which would leave PyTorch one thread; ``dask worker --nworkers 4`` starts four."""
    workers = client.scheduler_info()["workers"]
    cores = client.run(_cpu_count, on_error="ignore")
    on_machine = collections.Counter()
    for info in workers.values():
        on_machine[info["host"]] += info["nthreads"]
    return {address: max(1, cores[address] // on_machine[info["host"]]) for address, info in workers.items()
            if address in cores}


def _on_scheduler(address: str, jobs: list[dict], record, progress) -> None:
    from distributed import Client

    try:
        client = Client(address, timeout="20s")
    except (OSError, TimeoutError, ValueError) as error:  # ValueError: no address Dask can read
        raise OptionError(f"--scheduler {address}: no Dask scheduler answers there ({error})") from None
    with client:
        shares = threads_by_worker(client)
        progress.log(f"Dask cluster at {address}: {len(shares)} worker(s)")
        _run_all(client, [{**job, "worker_threads": shares} for job in jobs], record)


def _line(row: dict) -> str:
    if row["status"] == PAIR_FAILED:
        return f"{row['name']}: failed: {row['error']}"
    unit = " m²" if row["area_unit"] == "m2" else " px"
    return (f"{row['name']}: {row['status']}, {row['polygons']} change polygons, {row['changed_area']:,.0f}{unit} "
            f"changed ({row['seconds']:.1f} s)")


def detect_many(pairs: list[Pair], model, out, *, scheduler: str | None = None, workers: int | None = None,
                force: bool = False, vector_format: str = "gpkg", listed_in: str | None = None,
                progress: Progress | None = None, **options) -> list[dict]:
    """Detect changes in every pair into ``out/<name>/`` and summarise them in ``out/summary.gpkg`` and
    ``summary.csv``; returns the summary's rows, in the pairs' order.

    ``scheduler``: a Dask scheduler's address; without it, a cluster on this machine of ``workers`` workers
    (default: as the cores, GPUs and memory allow, see ``local_layout``). ``force``: run complete pairs
    again. ``options``: ``DetectOptions``' fields, for every pair (a pair's ``aoi`` wins over the run's).
    ``listed_in``: the CSV file of the pairs, which no output may replace, as none may replace any pair's input.
    """
    from geochange.engine.package import read_package
    from geochange.engine.zoo import sha256

    progress, o = progress or Progress(), DetectOptions.of(options)
    if scheduler and workers is not None:
        raise OptionError("--workers sizes the cluster of this machine; the cluster at --scheduler has its own")
    model = read_package(model)[0].resolve()  # a wrong file refused here, not by each pair in the cluster
    digest, out = sha256(model), Path(os.path.abspath(out))

    jobs = [make_job(pair, model, digest, out, o, vector_format) for pair in checked(list(pairs), "the pairs")]
    read = [listed_in, model, *(path for job in jobs for path in (job["pre"], job["post"], job["options"]["aoi"]))]
    check_outputs([*(out / name for name in SUMMARY_FILES),
                   *(Path(path) for job in jobs for path in pair_outputs(job).values())], read)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(out, error.strerror or str(error)) from None
    with folder_lock(out):  # one run at a time writes the summary
        rows = {}
        for job in jobs:
            kept = None if force else complete(job)
            rows[job["name"]] = {**kept[0], "status": PAIR_SKIPPED} if kept else pair_row(job, PAIR_PENDING)
            if kept and kept[1]:
                progress.log(f"{job['name']}: {', '.join(kept[1])} changed after the pair's run (edited?); kept as "
                             "they are (--force runs the pair again)")
        todo = [job for job in jobs if rows[job["name"]]["status"] == PAIR_PENDING]
        summary = Summary(out)
        summary.write(list(rows.values()))
        progress.log(f"{len(jobs)} pairs, {len(jobs) - len(todo)} complete already; model {model.name} "
                     f"(sha256 {digest[:12]}...)")
        progress.update(len(jobs) - len(todo), len(jobs))

        shown = set()  # log lines shown once, with the first pair that gave them: most repeat for every pair

        def record(row: dict) -> None:
            rows[row["name"]] = {k: v for k, v in row.items() if k not in ("peak_bytes", "log")}
            summary.write(list(rows.values()), now=False)
            for line in row.get("log", ()):
                if line not in shown:
                    shown.add(line)
                    progress.log(f"{row['name']}: {line}")
            progress.log(_line(row))
            progress.update(sum(r["status"] != PAIR_PENDING for r in rows.values()), len(jobs))

        if todo:
            try:
                if scheduler:
                    _on_scheduler(scheduler, todo, record, progress)
                else:
                    _on_this_machine(todo, record, o, workers, progress)
            except BaseException:  # a cancel, an error: the pairs that ended go in the summary; that error is told
                with contextlib.suppress(GeoChangeError):
                    summary.write(list(rows.values()))
                # The local cluster is closed, its workers ended: the temporaries of the pairs they ran go, which a
                # re-run would remove only from the pairs it runs. Not on a scheduler's cluster, whose running pairs
                # go on (a cancel does not stop them) on storage where a folder's lock may not hold (NFS).
                if not scheduler:
                    remove_left_temporaries(path for job in todo if rows[job["name"]]["status"] == PAIR_PENDING
                                            for path in pair_outputs(job).values())
                raise
            summary.write(list(rows.values()))
    return list(rows.values())
