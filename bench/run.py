"""``make bench``: the engine on large real-looking pairs against its compute and I/O floors.

Pairs are mirrored mosaics of the LEVIR-CD tile (``../shared/data/levir_tile_georef``), written once
to ``bench/data/`` (tiled, DEFLATE GeoTIFFs). For each model and size, three runs, each in a fresh
process so that its peak RSS is its own:
- wall: ``detect`` end to end (read, warp-free grid, model, blend, COG + polygons);
- compute floor: the model's forward alone over as many windows (the first tile row's, from memory),
  batched the same way;
- I/O floor: the same pipeline with the model replaced by a replay of the wall run's own probability
  raster (read, blend, write the same rasters, vectorise the same polygons: a model with random
  weights outlines noise, whose polygons cost more than those of a trained model).
TinyCD runs with its authors' LEVIR weights when they are beside the project, so that its mask and
polygons are those of a real run; other models run with random weights.
With ``--repeats N`` the three kinds run in turn N times; the fastest run of each kind is reported
(peak RSS: the largest) and the ratio is the median of the N runs' own ratios, each wall run against
the floors measured next to it (this shared machine's speed drifts by up to 20 % within minutes).
Results go to ``bench/results.md`` (appended per machine and device).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from geochange.engine.atomic import atomic_path

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("GEOCHANGE_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
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


def prediction_replay(probability_path: str, plan, device):
    """A stand-in for the model on ``device`` that returns, window by window in the order the pipeline
    runs them, the probability a wall run wrote (every window of a mosaic is valid; blending a
    blended probability again gives it back): the I/O floor then reads, writes and vectorises what
    that run did, on that device. ``predict.seconds``: its own reading time, no part of the floor."""
    import rasterio

    probability = rasterio.open(probability_path)
    windows = iter(plan.windows())

    def predict(pre, post):
        start = time.perf_counter()
        out = np.stack([probability.read(1, window=next(windows)) for _ in range(len(pre))])
        predict.seconds += time.perf_counter() - start
        return out

    predict.seconds = 0.0

    predict.device = device  # the pipeline sizes its reader threads by the model's device
    return predict


def _child(job: dict) -> dict:
    """One measured run, in this (fresh) process."""
    import torch

    from rasterio.windows import Window

    from geochange.engine.inference import prepare, stream_rows, write_outputs
    from geochange.engine.inputs import optical_input
    from geochange.engine.models import create
    from geochange.engine.package import ModelPackage, load_package, make_manifest

    torch.manual_seed(0)
    torch.set_num_threads(job["threads"])
    if job["package"]:
        package = load_package(job["package"])
    else:  # both dates RGB, as the mosaics are
        package = ModelPackage(create(job["model"]).eval(),
                               make_manifest(job["model"], inputs={"pre": optical_input(3), "post": optical_input(3)}))
    out = Path(job["out"])
    setup = prepare(job["pre"], job["post"], package, tile=job["tile"], overlap=job["overlap"], device=job["device"],
                    precision=job["precision"], threshold=0.5)
    plan, batch = setup.plan, job["batch"]
    windows = len(plan)
    h, w = min(plan.tile, plan.height), min(plan.tile, plan.width)
    read = setup.reader()
    pre, post, _ = read(Window(0, 0, w, h))
    read.close()
    # A warm-up batch of each size a tile row is cut into, before any timing: one-time set-up (CUDA's,
    # cuDNN's tuning and the graph capture per input shape, a few seconds) is no part of the figures.
    sizes = [min(batch, len(plan.cols) - j) for j in range(0, len(plan.cols), batch)]
    for n in set(sizes):
        setup.predictor(np.stack([pre] * n), np.stack([post] * n))
    if job["kind"] == "compute":
        # The first tile row's windows, from memory, for every row: real pixels, as M2CD's expert
        # routing (and so its speed) depends on them; batched as the pipeline batches them.
        read = setup.reader()
        row = [read(window) for window in plan.row_windows(0)]
        read.close()
        stacks = [tuple(np.stack([item[k] for item in row[j:j + batch]]) for k in (0, 1))
                  for j in range(0, len(row), batch)]
        rows = len(plan.rows) if not job.get("sample_rows") else job["sample_rows"]
        start = time.perf_counter()
        for _ in range(rows):
            for stack in stacks:
                setup.predictor(*stack)
        if setup.predictor.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) * len(plan.rows) / rows
    else:
        if job["kind"] == "io":
            setup.predictor = prediction_replay(job["replay"], plan, setup.predictor.device)
        read = setup.reader()
        start = time.perf_counter()
        try:
            write_outputs(setup, stream_rows(setup.predictor, plan, read, batch=batch),
                          probability=out / "p.tif", mask=out / "m.tif", polygons=out / "c.gpkg")
        finally:
            read.close()
        seconds = time.perf_counter() - start - getattr(setup.predictor, "seconds", 0.0)
    return {"seconds": seconds, "windows": windows, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "megapixels": plan.height * plan.width / 1e6}


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
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--models", nargs="+", default=["tinycd", "m2cd_mit_b0"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--overlap", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--skip", nargs="*", default=[], help="model:size pairs not to run, e.g. m2cd_mit_b0:16384")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each kind; the fastest is reported")
    parser.add_argument("--floor-sample-rows", type=int, default=0,
                        help="time the compute floor on this many tile rows and scale (0 = all)")
    parser.add_argument("--results", type=Path, default=HERE / "results.md")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    precision = f" {args.precision}" if args.device.startswith("cuda") else ""
    lines = [f"\n## {date.today()}: {machine(args.device)}, device {args.device}{precision}, {args.threads} threads, "
             f"tile {args.tile}, overlap {args.overlap}, batch {args.batch}, "
             f"fastest of {args.repeats} run(s) each, median ratio\n",
             "| model | size | windows | wall s | Mpx/s | compute floor s | I/O floor s | wall / max(floors) | peak RSS MB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    print(lines[0])
    for size in args.sizes:
        pre, post = mosaic(size, "pre"), mosaic(size, "post")
        for model in args.models:
            if f"{model}:{size}" in args.skip:
                continue
            out = HERE / "data" / "out"
            package = authors_package(model)
            job = {"model": model, "package": package and str(package), "pre": str(pre), "post": str(post),
                   "replay": str(out / "wall" / "p.tif"), "tile": args.tile, "overlap": args.overlap,
                   "batch": args.batch, "device": args.device, "precision": args.precision, "threads": args.threads}
            # Runs alternate wall, I/O (replaying that wall run), compute, so that a slow spell of a
            # shared machine touches all three.
            runs = [tuple(measure(dict(job, kind=kind, out=str(out / kind), sample_rows=args.floor_sample_rows))
                          for kind in ("wall", "io", "compute"))
                    for _ in range(args.repeats)]
            wall, io, compute = (min((r[k] for r in runs), key=lambda m: m["seconds"]) for k in range(3))
            wall["peak_rss_mb"] = max(r[0]["peak_rss_mb"] for r in runs)
            ratio = float(np.median([w["seconds"] / max(i["seconds"], c["seconds"]) for w, i, c in runs]))
            sampled = "*" if args.floor_sample_rows else ""
            weights = "authors' weights" if package else "random weights"
            lines.append(f"| {model} ({weights}) | {size}² | {wall['windows']} | {wall['seconds']:.1f} | "
                         f"{wall['megapixels'] / wall['seconds']:.3f} | {compute['seconds']:.1f}{sampled} | "
                         f"{io['seconds']:.1f} | {ratio:.3f} | {wall['peak_rss_mb']:.0f} |")
            print(lines[-1], flush=True)
    if args.floor_sample_rows:
        lines.append(f"\n\\* compute floor timed on {args.floor_sample_rows} tile rows and scaled to all rows.")
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
