"""``geochange detect-many`` against single ``geochange detect`` runs: N LEVIR-size pairs (the 1024² LEVIR
tile, each pair under its own name) on this machine's Dask cluster with one worker and with two, and the
same pair as separate ``geochange detect`` processes. Results are appended to ``bench/results.md``.

Every run is a fresh process with the TinyCD authors' weights (``bench/data/tinycd_levir.safetensors``), the
model's tile and the options' defaults; the threads a pair gets: all the cores for a single run and for one
worker, half for each of two (the local cluster's own choice). Measured:
- single: a ``geochange detect`` process on one pair, start to exit (imports, model load, detection,
  outputs), ``--singles`` times;
- detect-many with ``--workers 1`` and ``--workers 2``: the command's wall time over the pairs, and the
  pairs' own seconds (each task's time on its worker, the model's load included on a worker's first pair).
  With two workers, one worker first runs a pair alone to measure its memory (engine/many.py);
- the per-pair overhead: detect-many's wall per pair with one worker against a single run's wall (a single
  run pays the process start and the model's load each time, detect-many the cluster's start once).

    .venv/bin/python bench/many.py                       # 16 pairs of 1024², as the issue asks
    .venv/bin/python bench/many.py --pairs 4 --size 512  # a short check that it runs
"""
from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from dask.system import CPU_COUNT
from run import HERE, SHARED, authors_package, machine  # bench/run.py: the model package and the machine's name


def crop(size: int, folder: Path) -> tuple[Path, Path]:
    """The LEVIR tile's pre and post images, their top-left ``size`` x ``size`` pixels."""
    import rasterio
    from rasterio.windows import Window

    paths = []
    for date_ in ("pre", "post"):
        with rasterio.open(SHARED / "levir_tile_georef" / f"{date_}.tif") as src:
            window = Window(0, 0, min(size, src.width), min(size, src.height))
            profile = dict(src.profile, width=window.width, height=window.height,
                           transform=src.window_transform(window))
            with rasterio.open(folder / f"{date_}.tif", "w", **profile) as dst:
                dst.write(src.read(window=window))
        paths.append(folder / f"{date_}.tif")
    return paths[0], paths[1]


def timed(command: list) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "geochange.engine", *map(str, command)], capture_output=True,
                          text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(map(str, command))}\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - start


def pair_seconds(out: Path) -> list[float]:
    with open(out / "summary.csv", newline="") as f:
        return [float(row["seconds"]) for row in csv.DictReader(f)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024, help="pixels a side of each pair (the LEVIR tile's: 1024)")
    parser.add_argument("--singles", type=int, default=2, help="single detect runs timed")
    parser.add_argument("--note", default="", help="a line under the table (how quiet the machine was)")
    parser.add_argument("--results", type=Path, default=HERE / "results.md")
    args = parser.parse_args()
    (HERE / "data").mkdir(exist_ok=True)
    cores, model = CPU_COUNT, authors_package("tinycd")  # as the local cluster counts them
    with tempfile.TemporaryDirectory(dir=HERE / "data") as work:
        work = Path(work)
        pre, post = crop(args.size, work)
        table = work / "pairs.csv"
        table.write_text("name,pre,post\n" + "".join(f"p{i:02d},{pre},{post}\n" for i in range(args.pairs)))

        singles = [timed(["detect", pre, post, "--model", model, "--out", work / f"single{i}", "--threads", cores])
                   for i in range(args.singles)]
        single = statistics.mean(singles)
        rows = [f"| single `geochange detect` (1 pair, {cores} threads) | 1 | {single:.1f} | {single:.1f} | "
                f"{', '.join(f'{s:.1f}' for s in singles)} |"]
        per_pair = {}
        for workers in (1, 2):
            out = work / f"many{workers}"
            wall = timed(["detect-many", table, "--model", model, "--out", out, "--workers", workers])
            seconds = pair_seconds(out)
            per_pair[workers] = wall / args.pairs
            rows.append(f"| detect-many, {workers} worker(s) x {cores // workers} thread(s) | {args.pairs} | "
                        f"{wall:.1f} | {per_pair[workers]:.1f} | mean {statistics.mean(seconds):.1f}, median "
                        f"{statistics.median(seconds):.1f}, first {seconds[0]:.1f} |")
            print(rows[-1], flush=True)
    lines = [f"\n## {date.today()}: detect-many, {machine('cpu')}; {args.pairs} pairs of {args.size}² (the LEVIR "
             "tile), TinyCD (authors' weights), the model's tile (256), defaults otherwise (`bench/many.py`)\n",
             "| run | pairs | wall s | wall s a pair | a pair's own s (single: each process) |",
             "|---|---:|---:|---:|---|",
             *rows, "",
             f"- Per-pair overhead of detect-many (1 worker) against a single run: {per_pair[1] - single:+.1f} s "
             f"({per_pair[1] / single:.2f} x); 2 workers against 1: {per_pair[1] / per_pair[2]:.2f} x the throughput."]
    if args.note:
        lines.append(f"- {args.note}")
    print("\n".join(lines))
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
