"""``make bench``: the engine on large real-looking pairs against its compute and I/O floors.

Pairs are mirrored mosaics of the LEVIR-CD tile (``../shared/data/levir_tile_georef``), written once
to ``bench/data/`` (tiled, DEFLATE GeoTIFFs). For each model and size, each repeat is one fresh process
that measures, one after the other:
- fp32 floor: the model's eager fp32 forward alone over the windows of the wall run, each batch read
  into memory before it is timed, batched the same way (at 16384² over tile rows spread across the
  raster, scaled to all rows): what an engine running the model as trained costs at best;
- compute floor: the same on the run's own path, the fast path's floor (``--precision`` and ``--backend``,
  default auto as ``detect``'s: OpenVINO in bf16 on a CPU with AVX512-BF16 where OpenVINO is installed);
- wall: ``detect`` end to end (read, warp-free grid, model, blend, COG + polygons) and its own peak RSS
  (``wall_peak_rss_mb``: the floors timed before it, whose eager fp32 forward may take more, are not
  counted);
- both floors again: each floor is the mean of its two timings, which bracket the wall run;
- I/O floor: the same pipeline with the model replaced by a replay of the wall run's own probability
  raster (read, blend, write the same rasters, vectorise the same polygons: a model with random
  weights outlines noise, whose polygons cost more than those of a trained model).
They share a process so that the ratio compares runs a minute apart on the same memory: this shared
machine's speed drifts by up to 20 % between processes, and the floors of separate processes made the
ratio swing by as much; within a process the floor still moved by up to 22 % between its two timings.
TinyCD runs with its authors' LEVIR weights when they are beside the project, so that its mask and
polygons are those of a real run; other models run with random weights.
The set-up (``prepare``: the model loaded, an export made or read from the cache) and the first tile row (a
compile per window shape) are timed apart, before the rest, and are no part of the figures.
With ``--repeats N`` the fastest run of each kind is reported (peak RSS: the largest) and the ratios
(wall / the larger of the compute and I/O floors; wall / the fp32 floor) are the medians of the N
processes' own.
Results go to ``bench/results.md`` (appended per machine and device).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import ctypes
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from geochange.engine.atomic import atomic_path
from geochange.engine.shared_data import shared_data_dir

HERE = Path(__file__).resolve().parent
SHARED = shared_data_dir()
TINYCD_WEIGHTS = SHARED / "weights" / "tinycd_levir_official.pth"


def mosaic(size: int, name: str) -> Path:
    """A ``size`` x ``size`` mirrored mosaic of the LEVIR tile's pre or post image."""
    import rasterio
    out = HERE / "data" / f"levir_mosaic_{size}_{name}.tif"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(SHARED / "levir_tile_georef" / f"{name}.tif") as src:
        tile = src.read()
        profile = src.profile
    n = tile.shape[1]
    profile.update(width=size, height=size, tiled=True, blockxsize=512, blockysize=512, compress="deflate",
                   BIGTIFF="IF_SAFER")
    with atomic_path(out) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        for i in range(math.ceil(size / n)):
            row = tile[:, ::-1] if i % 2 else tile
            band = np.concatenate([row[:, :, ::-1] if j % 2 else row for j in range(math.ceil(size / n))], axis=2)
            rows = min(n, size - i * n)
            dst.write(band[:, :rows, :size], window=rasterio.windows.Window(0, i * n, size, rows))
    return out


def prediction_replay(probability_path: Path, plan, device):
    """A stand-in for the model on ``device`` that returns, window by window in the order the pipeline
    runs them, the probability a wall run wrote (every window of a mosaic is valid; blending a
    blended probability again gives it back): the I/O floor then reads, writes and vectorises what
    that run did, on that device. ``predict.seconds``: its own reading time, no part of the floor.

    The probability is copied first, untimed, to a raw array read through a memory map: read through
    GDAL, its blocks took a share of GDAL's cache that the run itself does not need (16384², TinyCD,
    a 256 MB cache: I/O floor 32.6 s reading through GDAL, 28.8-30.1 s through the map)."""
    import rasterio
    from osgeo import gdal

    scratch = probability_path.with_suffix(".npy")
    with rasterio.open(probability_path) as src:
        values = np.lib.format.open_memmap(scratch, "w+", np.float32, (src.height, src.width))
        for row in range(0, src.height, 4096):
            window = rasterio.windows.Window(0, row, src.width, min(4096, src.height - row))
            values[row:row + window.height] = src.read(1, window=window)
        values.flush()
    with contextlib.suppress(OSError):  # the map stays readable on Linux; no 1 GiB file is left behind
        scratch.unlink()
    cache = gdal.GetCacheMax()
    gdal.SetCacheMax(0)  # the copy's blocks out of the cache: the floor starts as the wall run did
    gdal.SetCacheMax(cache)
    windows = iter(plan.windows())

    def predict(pre, post, valid=None):
        start = time.perf_counter()
        out = np.stack([values[w.row_off:w.row_off + w.height, w.col_off:w.col_off + w.width]
                        for w in (next(windows) for _ in range(len(pre)))])
        predict.seconds += time.perf_counter() - start
        return out

    predict.seconds = 0.0

    predict.device = device  # the pipeline sizes its reader threads by the model's device
    return predict


def _child(job: dict) -> dict:
    """The wall run, then the compute and I/O floors, in this (fresh) process."""
    import torch

    from geochange.engine.detect import prepare, write_outputs
    from geochange.engine.inputs import optical_input
    from geochange.engine.models import create
    from geochange.engine.options import DetectOptions
    from geochange.engine.predictor import Predictor
    from geochange.engine.stream import stream_rows
    from geochange.engine.manifest import make_manifest
    from geochange.engine.package import ModelPackage, load_package
    from geochange.engine.process import configure_process
    from geochange.engine.progress import Progress

    class Log(Progress):
        def log(self, message):
            print(message, file=sys.stderr, flush=True)  # the parent shows a failed run's

    torch.manual_seed(0)
    configure_process(threads=job["threads"])  # as the command line's runs are
    if job["package"]:
        package = load_package(job["package"])
    else:  # both dates RGB, as the mosaics are
        package = ModelPackage(create(job["model"]).eval(),
                               make_manifest(job["model"], inputs={"pre": optical_input(3), "post": optical_input(3)}))
    options = DetectOptions(tile=job["tile"], overlap=job["overlap"], device=job["device"], precision=job["precision"],
                            backend=job["backend"], threshold=0.5)
    start = time.perf_counter()
    setup = prepare(job["pre"], job["post"], package, options, size_gdal_cache=True, progress=Log())
    setup_seconds = time.perf_counter() - start
    plan, batch = setup.plan, job["batch"]

    # The first tile row through the pipeline (its rows not written) before any timing: one-time set-up
    # (CUDA's, cuDNN's tuning and the graph capture of each batch size, a few seconds) is no part of the
    # figures. (M2CD's first full run on a CPU still grows its heap: 0.6-1.2 s of first page faults at
    # 1024², counted in its wall time.)
    read, start = setup.reader(), time.perf_counter()
    for _ in stream_rows(setup.predictor, plan, read, batch=batch, tile_rows=range(1)):
        pass
    read.close()
    first_row_seconds = time.perf_counter() - start
    out = Path(job["out"])

    def pipeline(predictor, folder: str) -> float:
        setup.predictor = predictor
        read = setup.reader()
        start = time.perf_counter()
        try:
            write_outputs(setup, stream_rows(predictor, plan, read, batch=batch), probability=out / folder / "p.tif",
                          mask=out / folder / "m.tif", polygons=out / folder / "c.gpkg")
        finally:
            read.close()
        return time.perf_counter() - start - getattr(predictor, "seconds", 0.0)

    model = setup.predictor
    # The fp32 floor: the same windows through the model in fp32, eager (the floor of every peer's engine).
    fp32 = Predictor(model.package, model.device, precision="fp32")
    # The compute floor: the windows of the wall run (or of --floor-sample-rows tile rows spread over the
    # raster), from memory; real pixels, as M2CD's expert routing, and so its speed, depends on them.
    count = job.get("sample_rows") or len(plan.rows)
    rows = sorted(set(np.linspace(0, len(plan.rows) - 1, count).round().astype(int).tolist()))

    def compute_floor(model) -> float:
        read, seconds = setup.reader(), 0.0
        for i in rows:  # batched as the pipeline batches them, each batch read into memory, then timed
            row = plan.row_windows(i)
            for j in range(0, len(row), batch):
                items = [read(window) for window in row[j:j + batch]]
                pre, post = (np.stack([item[k] for item in items]) for k in (0, 1))
                start = time.perf_counter()
                model(pre, post)  # returns host arrays: the device has finished
                seconds += time.perf_counter() - start
        read.close()
        return seconds * len(plan.rows) / len(rows)

    # Timed just before and just after the wall run, so that a drift of the machine's speed over the
    # minutes of a process weighs on both sides of the ratio alike.
    seconds = {"fp32_before": compute_floor(fp32), "compute_before": compute_floor(model)}
    seconds["wall"], peak_rss_mb = wall_peak_rss_mb(lambda: pipeline(model, "wall"))
    seconds["compute_after"] = compute_floor(model)
    seconds["fp32_after"] = compute_floor(fp32)
    for kind in ("compute", "fp32"):
        seconds[kind] = (seconds[f"{kind}_before"] + seconds[f"{kind}_after"]) / 2
    seconds["io"] = pipeline(prediction_replay(out / "wall" / "p.tif", plan, model.device), "io")
    seconds.update(setup=setup_seconds, first_row=first_row_seconds)
    runs = getattr(model, "original", model)  # a router's members share its path
    return {"seconds": seconds, "windows": len(plan), "peak_rss_mb": peak_rss_mb,
            "megapixels": plan.height * plan.width / 1e6, "precision": str(runs.dtype).removeprefix("torch."),
            "backend": runs.backend}


def wall_peak_rss_mb(run) -> tuple:
    """``run()``'s result and the process's peak resident memory (MB) while it ran: the memory the process
    holds free (glibc keeps it, see ``engine.process``) is given back first, and the kernel's peak count
    restarted (Linux)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    result = run()
    status = Path("/proc/self/status").read_text().splitlines()
    return result, next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def authors_package(model: str) -> Path | None:
    """The TinyCD authors' weights as a package (made once in bench/data/), or None."""
    if model != "tinycd" or not TINYCD_WEIGHTS.is_file():
        return None
    from geochange.engine.importers import import_weights
    out = HERE / "data" / "tinycd_levir.safetensors"
    if not out.exists():
        import_weights("tinycd", TINYCD_WEIGHTS, out)
    return out


def measure(job: dict) -> dict:
    run = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"benchmark run failed: {job}\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    import importlib.metadata

    import torch

    from geochange.engine.backends import openvino_installed
    from geochange.engine.hardware import cpu_flags

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    openvino = f", OpenVINO {importlib.metadata.version('openvino')}" if openvino_installed() else ""
    return f"{cpu} ({' '.join(cpu_flags())}), {os.cpu_count()} cores, torch {torch.__version__}{openvino}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--models", nargs="+", default=["tinycd", "m2cd_mit_b0"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", help="the run's (default auto, as detect's)")
    parser.add_argument("--backend", default="auto", help="the run's on a CPU (default auto, as detect's)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--skip", nargs="*", default=[], help="model:size pairs not to run, e.g. m2cd_mit_b0:16384")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measuring processes; the fastest of each kind is reported")
    parser.add_argument("--floor-sample-rows", type=int, default=0,
                        help="time the compute floor on this many tile rows and scale (0 = all)")
    parser.add_argument("--results", type=Path, default=HERE / "results.md")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    lines = [f"\n## {date.today()}: {machine(args.device)}, device {args.device}, precision {args.precision}, "
             f"backend {args.backend}, {args.threads} threads, tile {args.tile}, overlap {args.overlap}, "
             f"batch {args.batch}, fastest of {args.repeats} run(s) each, median ratios\n",
             "| model | size | windows | backend, precision | wall s | Mpx/s | fp32 floor s | compute floor s "
             "| I/O floor s | wall / max(floors) | wall / fp32 floor | peak RSS MB | set-up s, first row s |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print(lines[0])
    notes = []
    for size in args.sizes:
        pre, post = mosaic(size, "pre"), mosaic(size, "post")
        for model in args.models:
            if f"{model}:{size}" in args.skip:
                continue
            package = authors_package(model)
            job = {"model": model, "package": package and str(package), "pre": str(pre), "post": str(post),
                   "out": str(HERE / "data" / "out"), "tile": args.tile, "overlap": args.overlap,
                   "batch": args.batch, "device": args.device, "precision": args.precision, "backend": args.backend,
                   "threads": args.threads,
                   "sample_rows": args.floor_sample_rows}
            runs = [measure(job) for _ in range(args.repeats)]
            wall, io, compute, fp32 = (min(r["seconds"][kind] for r in runs)
                                       for kind in ("wall", "io", "compute", "fp32"))
            ratios = [r["seconds"]["wall"] / max(r["seconds"]["io"], r["seconds"]["compute"]) for r in runs]
            ratio = float(np.median(ratios))
            to_fp32 = float(np.median([r["seconds"]["wall"] / r["seconds"]["fp32"] for r in runs]))
            peak_rss_mb, first = max(r["peak_rss_mb"] for r in runs), runs[0]
            sampled = "*" if args.floor_sample_rows else ""
            weights = "authors' weights" if package else "random weights"
            lines.append(f"| {model} ({weights}) | {size}² | {first['windows']} | {first['backend']}, "
                         f"{first['precision']} | {wall:.1f} | {first['megapixels'] / wall:.3f} | "
                         f"{fp32:.1f}{sampled} | {compute:.1f}{sampled} | {io:.1f} | {ratio:.3f} | {to_fp32:.3f} | "
                         f"{peak_rss_mb:.0f} | {first['seconds']['setup']:.1f}, {first['seconds']['first_row']:.1f} |")
            print(lines[-1], flush=True)
            notes.append(f"{model} {size}², per process (wall / compute floor before, after / fp32 floor before, "
                         "after / I/O floor s: ratio): "
                         + ", ".join("{wall:.1f} / {compute_before:.1f}, {compute_after:.1f} / {fp32_before:.1f}, "
                                     "{fp32_after:.1f} / {io:.1f}: ".format(**r["seconds"]) + f"{q:.3f}"
                                     for r, q in zip(runs, ratios)))
    lines += [""] + [f"- {note}" for note in notes]
    if args.floor_sample_rows:
        lines.append(f"\n\\* compute floor timed on {args.floor_sample_rows} tile rows spread over the raster, "
                     "scaled to all rows.")
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
