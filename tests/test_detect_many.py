"""``geochange detect-many`` on real Dask clusters: a scheduler and two workers started as processes on
127.0.0.1 (one killed mid-run), and the default cluster of this machine; six pairs of the shared data, four
that work and two that fail, against single ``geochange detect`` runs of the same pairs. The pair lists, the
local cluster's layout and the completeness of a pair's outputs, without a cluster; the QGIS algorithm."""
from __future__ import annotations

import csv
import filecmp
import glob
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Recorded, run_algorithm
from geochange.engine.contracts import PAIR_DONE, PAIR_FAILED, PAIR_PENDING, PAIR_SKIPPED, SUMMARY_LAYER
from geochange.engine.errors import Cancelled, OptionError, OutputError, PackageError
from geochange.engine.many import Layout, detect_many, local_layout, make_job
from geochange.engine.pair_task import RECORD, complete, identity, pair_row, write_record
from geochange.engine.options import DetectOptions
from geochange.engine.pairs import Pair, checked, glob_pairs, pairs_from, read_pairs

# The same threads in every run (a single detect, a worker's pair) give the same floats, hence the same bytes.
OPTIONS = ["--pre-bands", "1,2,3", "--post-bands", "1,2,3", "--device", "cpu", "--threads", "1"]
# A GeoPackage records when it was written (gpkg_contents.last_change, GDAL's clock): pinned, two runs of the
# same pair give the same bytes. GDAL reads it from the environment, which Dask's worker processes inherit.
ENV = {**os.environ, "OGR_CURRENT_DATE": "2000-01-01T00:00:00Z", "OMP_NUM_THREADS": "1"}
WORKING = ("levir", "levir_utm", "haiti", "landsat")
FAILING = {"apart": "do not overlap", "corrupt": "the file is corrupt"}
TIMEOUT = 900


def geochange(*args, **options) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "geochange.engine", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT, **options)


@pytest.fixture(scope="module")
def pairs_csv(shared_data, tmp_path_factory) -> Path:
    """The six pairs: the LEVIR tile, its post image reprojected to UTM (both in a 320 px area of interest, to
    keep the run short), Haiti's Sentinel-2 and Taizhou's Landsat pairs (bands 1-3 of 4 and 6), two rasters
    that do not overlap, and a pre image cut short (its pixels cannot be read)."""
    import rasterio
    from rasterio.windows import Window, bounds

    from conftest import write_polygons

    folder = tmp_path_factory.mktemp("many_inputs")
    tile = shared_data / "levir_tile_georef"
    with rasterio.open(tile / "pre.tif") as src:
        left, bottom, right, top = bounds(Window(352, 352, 320, 320), src.transform)
    aoi = write_polygons(folder / "aoi.gpkg", [{"type": "Polygon", "coordinates": [
        [[left, bottom], [right, bottom], [right, top], [left, top], [left, bottom]]]}], 4326)
    data = (tile / "pre.tif").read_bytes()
    (folder / "cut.tif").write_bytes(data[:len(data) * 6 // 10])
    rows = [("levir", tile / "pre.tif", tile / "post.tif", aoi.name),
            ("levir_utm", tile / "pre.tif", tile / "post_utm14n_0.6m_shifted.tif", aoi.name),
            ("haiti", shared_data / "haiti_s2" / "pre_2018.tif", shared_data / "haiti_s2" / "post_2019.tif", ""),
            ("apart", tile / "pre.tif", shared_data / "haiti_s2" / "post_2019.tif", ""),
            ("corrupt", "cut.tif", tile / "post.tif", ""),  # relative to the CSV's folder
            ("landsat", shared_data / "landsat_taizhou" / "pre_2000.tif",
             shared_data / "landsat_taizhou" / "post_2003.tif", "")]
    with open(folder / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("name", "pre", "post", "aoi"), *rows])
    return folder / "pairs.csv"


@pytest.fixture(scope="module")
def singles(pairs_csv, tinycd_package, tmp_path_factory) -> dict[str, Path]:
    """Each working pair through ``geochange detect``: its output folder."""
    folder = tmp_path_factory.mktemp("singles")
    for pair in read_pairs(pairs_csv):
        if pair.name in WORKING:
            done = geochange("detect", pair.pre, pair.post, "--model", tinycd_package, "--out", folder / pair.name,
                             *OPTIONS, *(["--aoi", pair.aoi] if pair.aoi else []))
            assert done.returncode == 0, done.stderr
    return {name: folder / name for name in WORKING}


def summary(out: Path) -> dict[str, dict]:
    with open(out / "summary.csv", newline="", encoding="utf-8") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def check_run(out: Path, singles: dict, statuses: dict) -> None:
    """The working pairs' outputs are the single runs' byte for byte, the failing pairs left no folder and
    their rows name the problem, the summary holds every pair (``statuses``), nothing half-written is left."""
    for name, single in singles.items():
        outputs = sorted(p.name for p in (out / name).iterdir())
        assert outputs == sorted([p.name for p in single.iterdir()] + [RECORD]), name
        for output in single.iterdir():
            assert filecmp.cmp(output, out / name / output.name, shallow=False), (name, output.name)
    rows = summary(out)
    assert {name: row["status"] for name, row in rows.items()} == statuses
    for name, problem in FAILING.items():
        assert not (out / name).exists() and problem in rows[name]["error"], rows[name]
    assert int(rows["levir"]["polygons"]) > 0 and float(rows["levir"]["changed_area"]) > 0
    assert all(rows[name]["model_sha256"] == rows["levir"]["model_sha256"] for name in rows)
    assert not list(out.rglob("*.partial*"))

    from osgeo import ogr

    source = ogr.Open(str(out / "summary.gpkg"))
    layer = source.GetLayerByName(SUMMARY_LAYER)
    envelopes = {f.GetField("name"): f.GetGeometryRef() and f.GetGeometryRef().GetEnvelope() for f in layer}
    assert sorted(envelopes) == sorted(statuses)
    # levir's footprint is its area of interest, in longitude and latitude.
    assert envelopes["levir"][0] == pytest.approx(-97.9812, abs=1e-3)


# --- A scheduler and two workers, as processes --------------------------------------------------------------

@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """``dask scheduler`` and two ``dask worker`` processes (one thread, no nanny: a killed worker stays dead) on
    127.0.0.1: the scheduler's address and a client that watches them."""
    from distributed import Client

    folder = tmp_path_factory.mktemp("dask")
    file = folder / "scheduler.json"
    processes, logs = [], []

    def start(*args, log):
        logs.append(open(folder / log, "w"))
        processes.append(subprocess.Popen([sys.executable, "-m", *args], env=ENV, stdout=subprocess.DEVNULL,
                                          stderr=logs[-1], cwd=folder))
    try:
        start("distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
              "--scheduler-file", file, log="scheduler.log")
        for name in ("one", "two"):
            start("distributed.cli.dask_worker", "--scheduler-file", file, "--host", "127.0.0.1", "--nthreads", "1",
                  "--no-nanny", "--no-dashboard", "--memory-limit", "0", "--name", name, log=f"{name}.log")
        client = Client(scheduler_file=str(file), timeout="120s")
        client.wait_for_workers(2, timeout=120)
        yield client.scheduler.address, client
        client.close()
    finally:
        for process in processes:
            process.kill()
            process.wait()
        for log in logs:
            log.close()


def test_a_scheduler_and_two_workers_one_killed_mid_run(dask_cluster, pairs_csv, singles, tinycd_package, tmp_path):
    address, client = dask_cluster
    out = tmp_path / "out"
    run = [sys.executable, "-m", "geochange.engine", "detect-many", pairs_csv, "--model", tinycd_package, "--out", out,
           "--scheduler", address, *OPTIONS]
    with open(tmp_path / "run.log", "w+") as log:
        process = subprocess.Popen(list(map(str, run)), env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            # Once a pair is being written, its worker dies (SIGKILL: no clean-up of any kind).
            deadline, killed, pids = time.monotonic() + TIMEOUT, None, client.run(os.getpid)
            while killed is None and time.monotonic() < deadline and process.poll() is None:
                writing = {p.parent.name for p in out.glob("*/.*.partial*")}
                for worker, keys in client.processing().items():
                    busy = {name for name in writing for key in keys if key.startswith(f"geochange-{name}-")}
                    if busy:
                        killed = busy.pop()
                        os.kill(pids[worker], signal.SIGKILL)
                        midway = summary(out)  # rewritten as each pair ends: those not ended yet are pending
                        break
                time.sleep(0.05)
            assert killed, "no pair was seen being written"
            assert process.wait(TIMEOUT) == 1  # some pairs failed
        finally:
            process.kill()
        log.seek(0)
        text = log.read()
    assert "6 pairs: 4 done, 0 complete already, 2 failed" in text, text
    assert len(midway) == 6 and midway[killed]["status"] == PAIR_PENDING
    statuses = {**dict.fromkeys(WORKING, PAIR_DONE), **dict.fromkeys(FAILING, PAIR_FAILED)}
    check_run(out, singles, statuses)
    assert len(client.scheduler_info()["workers"]) == 1  # the pair the dead worker held ran on the other

    # Run again: only what is missing runs (one output gone, and the failed pairs), the rest is not touched.
    (out / "landsat" / "change_mask.tif").unlink()
    kept = {p: p.stat().st_mtime_ns for name in ("levir", "levir_utm", "haiti") for p in (out / name).iterdir()}
    again = geochange("detect-many", pairs_csv, "--model", tinycd_package, "--out", out, "--scheduler", address,
                      *OPTIONS)
    assert again.returncode == 1 and "6 pairs: 1 done, 3 complete already, 2 failed" in again.stdout, again.stderr
    check_run(out, singles, {**statuses, "levir": PAIR_SKIPPED, "levir_utm": PAIR_SKIPPED, "haiti": PAIR_SKIPPED})
    assert {p: p.stat().st_mtime_ns for p in kept} == kept


def test_pairs_on_a_scheduler_s_workers_share_their_machine_s_cores(dask_cluster, levir_crop, tinycd_package,
                                                                     tmp_path):
    """Workers on one machine, started with ``OMP_NUM_THREADS=1`` as a nanny starts them: a pair not given
    ``--threads`` runs PyTorch on its worker's share of the machine's cores, neither one thread nor every core."""
    from dask.system import CPU_COUNT

    from geochange.engine.many import threads_by_worker
    from geochange.engine.pair_task import run_pair
    from geochange.engine.zoo import sha256

    _, client = dask_cluster
    workers = client.scheduler_info()["workers"]  # one task thread each
    assert threads_by_worker(client) == dict.fromkeys(workers, max(1, CPU_COUNT // len(workers)))
    # The pair takes its worker's share (2 here, told apart from the workers' OMP_NUM_THREADS=1).
    job = make_job(Pair("p", str(levir_crop["pre"]), str(levir_crop["post"])), tinycd_package.resolve(),
                   sha256(tinycd_package), tmp_path / "out", DetectOptions(pre_bands=(1, 2, 3), post_bands=(1, 2, 3),
                                                                          device="cpu"), "gpkg")
    row = client.submit(run_pair, {**job, "worker_threads": dict.fromkeys(workers, 2)}, pure=False).result(TIMEOUT)
    assert row["status"] == PAIR_DONE, row["error"]
    assert any(line.endswith("on cpu, 2 threads") for line in row["log"]), row["log"]


# --- The default cluster of this machine ----------------------------------------------------------------

def test_the_local_cluster_by_default(pairs_csv, singles, tinycd_package, tmp_path):
    out = tmp_path / "out"
    done = geochange("detect-many", pairs_csv, "--model", tinycd_package, "--out", out, *OPTIONS)
    assert done.returncode == 1, done.stderr
    assert "6 pairs: 4 done, 0 complete already, 2 failed" in done.stdout
    # One worker measured its memory on the widest pair first, then a worker a core (at most one a pair left)
    # ran the rest.
    assert "measuring a worker's memory on the widest pair" in done.stdout
    workers = min(len(os.sched_getaffinity(0)), 5)
    assert re.search(rf"local Dask cluster: {workers} worker\(s\) x 1 thread\(s\), [\d.]+ GiB of memory each "
                     r"\(a worker's measured peak: [\d.]+ GiB\)", done.stdout), done.stdout
    check_run(out, singles, {**dict.fromkeys(WORKING, PAIR_DONE), **dict.fromkeys(FAILING, PAIR_FAILED)})

    # --force runs a complete pair again; the summary then lists the pairs given.
    only = tmp_path / "landsat.csv"
    with open(pairs_csv) as f, open(only, "w") as g:
        g.writelines(line for line in f if line.startswith(("name,", "landsat,")))
    forced = geochange("detect-many", only, "--model", tinycd_package, "--out", out, "--force", *OPTIONS)
    assert forced.returncode == 0 and "1 pairs: 1 done, 0 complete already, 0 failed" in forced.stdout, forced.stderr
    assert filecmp.cmp(out / "landsat" / "change_mask.tif", singles["landsat"] / "change_mask.tif", shallow=False)


# --- Without a cluster ----------------------------------------------------------------------------------

def test_a_csv_of_pairs(tmp_path):
    (tmp_path / "a").mkdir()
    table = tmp_path / "a" / "pairs.csv"
    table.write_text("pre,post,aoi\nx/1.tif,y/1.tif,zone.gpkg|layername=z\n/abs/2.tif,/abs/3.tif,\n")
    assert read_pairs(table) == [Pair("1", str(tmp_path / "a/x/1.tif"), str(tmp_path / "a/y/1.tif"),
                                      str(tmp_path / "a/zone.gpkg") + "|layername=z"),
                                 Pair("3", "/abs/2.tif", "/abs/3.tif")]
    for text, problem in (("pre,after\na,b\n", "the columns must be pre, post"),
                          ("pre,post\na,b/x.tif\nc,d/x.tif\n", "two pairs are named 'x'"),
                          ("pre,post,name\na,b,summary.csv\n", "cannot name a pair's output folder"),
                          ("pre,post,name\na,b,summary.gpkg-wal\n", "cannot name a pair's output folder"),
                          ("pre,post,name\na,b,Tile1\nc,d,tile1\n", "two pairs are named 'Tile1' and 'tile1'"),
                          ("pre,post,name\na,b,caf\u00e9\nc,d,cafe\u0301\n", "one output folder (where case"),
                          ("pre,post,name\na,b,../up\n", "cannot name a pair's output folder"),
                          # On Windows: another drive's folder, a device, one folder for "x." and "x".
                          ("pre,post,name\na,b,C:escaped\n", "cannot name a pair's output folder"),
                          ("pre,post,name\na,b,nul.tile\n", "cannot name a pair's output folder"),
                          ("pre,post,name\na,b,x.\n", "cannot name a pair's output folder"),
                          ('pre,post,name\na,b,"two\nlines"\n', "cannot name a pair's output folder"),
                          ("pre,post\na,\n", "line 2: a pair needs both"), ("pre,post\n", "no pairs")):
        table.write_text(text)
        with pytest.raises(OptionError, match=re.escape(problem)):
            read_pairs(table)
    with pytest.raises(OptionError, match="no such pairs file"):
        read_pairs(tmp_path / "none.csv")


def test_a_csv_of_pairs_that_would_be_misread_is_refused(tmp_path):
    """An empty file, values past the header's columns (a path's comma unquoted), a column named twice, and a
    spreadsheet's other encodings: refused in one line each, not with a traceback, nor read as pairs of other files.
    Empty values past the columns (trailing commas) are none."""
    table = tmp_path / "pairs.csv"
    for data, problem in ((b"", ": no pairs (the file is empty)"),
                          (b"pre,post\ndata/my,pre.tif,data/post.tif\n",
                           ", line 2: more values than the header's columns (quote paths that contain commas)"),
                          (b"pre,post,pre\na,b,c\n", ": the header names pre twice"),
                          ("name,pre,post\nZürich,a,b\n".encode("cp1252"), ': not UTF-8 text; save it as "CSV UTF-8"'),
                          ("pre,post\na,b\n".encode("utf-16"), ': not UTF-8 text; save it as "CSV UTF-8"')):
        table.write_bytes(data)
        with pytest.raises(OptionError, match=re.escape(f"{table}{problem}")):
            read_pairs(table)
    table.write_bytes(b"pre,post\na,b,,\n")
    assert read_pairs(table) == [Pair("b", str(tmp_path / "a"), str(tmp_path / "b"))]


def test_a_cancel_while_a_pair_runs_stops_the_run(tmp_path):
    """The signal's Cancelled, raised in this process while it waits for a task, is no failure of the pair: the run
    stops (before, the pair was recorded as failed and the next one started)."""
    from geochange.engine.many import _outcome

    class Waiting:
        def result(self):
            raise Cancelled("cancelled: the engine process was asked to stop")

    class Died:
        def result(self):
            raise OSError("the worker died")

    job = make_job(Pair("p", "a.tif", "b.tif"), tmp_path / "m.safetensors", "0" * 64, tmp_path, DetectOptions(),
                   "gpkg")
    with pytest.raises(Cancelled):
        _outcome(Waiting(), job)
    row = _outcome(Died(), job)
    assert row["status"] == PAIR_FAILED and row["error"] == "the task failed on the cluster: OSError: the worker died"


def test_a_pair_s_outline_in_degrees_none_in_a_local_crs():
    """The summary's footprints are in EPSG:4326; a pair in a site's own frame is on no place on Earth: no
    footprint, not a failure of a pair whose outputs were written."""
    from rasterio.crs import CRS

    from geochange.engine.pair_task import _lonlat_outline

    site = CRS.from_wkt('LOCAL_CS["site grid",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]')
    lines = Recorded()
    assert _lonlat_outline((0, 0, 100, 100), site, lines) is None
    assert _lonlat_outline((0, 0, 100, 100), None, lines) is None
    assert _lonlat_outline((500000, 0, 500100, 100), CRS.from_epsg(32633), lines).startswith("POLYGON ((15")
    assert lines.lines == []


def test_a_pair_whose_outline_has_no_longitudes_and_latitudes_is_done(random_package, tmp_path):
    """A geostationary view whose corners are off the Earth: its pair is done, recorded (a re-run skips it) and
    logged without a footprint; a failed one keeps its own error, which the outline's does not replace."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from geochange.engine.pair_task import run_pair
    from geochange.engine.zoo import sha256

    disk = "+proj=geos +h=35785831 +lon_0=0 +sweep=y +datum=WGS84 +units=m +no_defs"
    corners = from_origin(-5.5e6, 5.5e6, 1.1e7 / 64, 1.1e7 / 64)  # 64 px over the disk's square: its corners off it
    for seed, date in enumerate(("pre", "post")):
        with rasterio.open(tmp_path / f"{date}.tif", "w", driver="GTiff", width=64, height=64, count=3,
                           dtype="uint8", crs=disk, transform=corners) as dst:
            dst.write(np.random.default_rng(seed).integers(0, 255, (3, 64, 64), dtype=np.uint8))
    pair = Pair("disk", str(tmp_path / "pre.tif"), str(tmp_path / "post.tif"))
    for bands, status in (((1, 2, 3), PAIR_DONE), ((1, 2, 7), PAIR_FAILED)):
        job = make_job(pair, random_package.resolve(), sha256(random_package), tmp_path / str(status),
                       DetectOptions(pre_bands=bands, device="cpu", threads=1, backend="eager"), "gpkg")
        row = run_pair(job)
        assert (row["status"], row["footprint"]) == (status, None), row["error"]
        assert any(line.startswith("no footprint in the summary: the raster's outline does not project to "
                                   "longitude and latitude") for line in row["log"]), row["log"]
        assert (complete(job) is not None) == (status == PAIR_DONE)
    assert row["error"].endswith("pre.tif: band(s) [7] do not exist; the pre image has 3 band(s)")


def test_two_globs_pair_files_by_what_the_wildcards_match(tmp_path, monkeypatch):
    for path in ("before/t1.tif", "before/t2.tif", "after/t1.tif", "after/t2.tif", "tiles/a/pre.tif",
                 "tiles/a/post.tif", "tiles/b/pre.tif", "tiles/b/post.tif", "x[1]/pre/a.tif", "x[1]/post/a.tif"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    monkeypatch.chdir(tmp_path)
    assert glob_pairs("before/*.tif", "after/*.tif") == [
        Pair("t1", str(tmp_path / "before/t1.tif"), str(tmp_path / "after/t1.tif")),
        Pair("t2", str(tmp_path / "before/t2.tif"), str(tmp_path / "after/t2.tif"))]
    assert [p.name for p in glob_pairs("tiles/*/pre.tif", "tiles/*/post.tif")] == ["a", "b"]
    # Without the dot ('*tif'): the names' trailing dots, which Windows drops from a folder's, are left out.
    assert [p.name for p in checked(glob_pairs("before/*tif", "after/*tif"), "the pairs")] == ["t1", "t2"]
    # A folder's name escaped (QGIS's two folders) is no wildcard.
    assert [p.name for p in glob_pairs(glob.escape("x[1]/pre") + "/*.tif", glob.escape("x[1]/post") + "/*.tif")] == \
        ["a"]
    (tmp_path / "after/t3.tif").touch()
    with pytest.raises(OptionError, match=r"1 file\(s\) without a partner in --pre-glob .*after/t3.tif"):
        glob_pairs("before/*.tif", "after/*.tif")
    with pytest.raises(OptionError, match="has no wildcard"):
        glob_pairs("before/t1.tif", "after/*.tif")
    with pytest.raises(OptionError, match="matches no file"):
        glob_pairs("nowhere/*.tif", "after/*.tif")
    for path in ("deep/a_b/c.tif", "deep/a/b_c.tif"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    with pytest.raises(OptionError, match=re.escape(f"--pre-glob 'deep/*/*.tif': {tmp_path / 'deep/a/b_c.tif'} and "
                                                    f"{tmp_path / 'deep/a_b/c.tif'} both name pair 'a_b_c'")):
        glob_pairs("deep/*/*.tif", "after/*.tif")
    with pytest.raises(OptionError, match="as a CSV file, or as both --pre-glob and --post-glob"):
        pairs_from("p.csv", "before/*.tif", None)


def test_a_wrong_model_is_refused_before_any_cluster_starts(tmp_path):
    """Not by each pair on the workers, after the cluster started."""
    pickled = tmp_path / "model.pth"
    pickled.write_bytes(pickle.dumps({"weight": [1.0]}))
    pairs = [Pair("a", str(tmp_path / "pre.tif"), str(tmp_path / "post.tif"))]
    for model, problem in ((pickled, "this is a PyTorch pickle checkpoint"), (tmp_path, "no such model file")):
        with pytest.raises(PackageError, match=re.escape(f"{model}: {problem}")):
            detect_many(pairs, model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_outputs_that_replace_a_pair_s_input_are_refused_before_any_cluster_starts(random_package, tmp_path,
                                                                                   monkeypatch):
    """A pair that reads another's output, or an area of interest that is a pair's polygons: refused before the
    summary is written or the cluster starts, as the CSV of the pairs is."""
    import geochange.engine.many as many

    monkeypatch.setattr(many, "_on_this_machine", lambda *args: pytest.fail("the cluster started"))
    out = tmp_path / "out"
    for path in ("pre.tif", "post.tif", "out/a/change_probability.tif", "out/b/change_polygons.gpkg"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"raster")
    a = Pair("a", str(tmp_path / "pre.tif"), str(tmp_path / "post.tif"))
    for pairs, aoi, output in (([a, Pair("b", str(out / "a/change_probability.tif"), a.post)], None,
                                out / "a/change_probability.tif"),
                               ([a, Pair("b", a.pre, a.post)], str(out / "b/change_polygons.gpkg"),
                                out / "b/change_polygons.gpkg")):
        with pytest.raises(OutputError, match=re.escape(f"{output}: this output is also an input of the run")):
            detect_many(pairs, random_package, out, aoi=aoi)
    assert not (out / "summary.gpkg").exists()


def test_a_cancel_removes_the_temporaries_of_the_pairs_it_stopped(random_package, tmp_path, monkeypatch):
    """The workers ended mid-pair leave their temporaries, which a re-run would remove only from the pairs it runs
    again: the cancelled run removes them, and leaves the other files of the pair's folder."""
    import geochange.engine.many as many

    folder = tmp_path / "out" / "b"
    left = [folder / ".change_mask.0123abcd.partial.tif", folder / ".change_mask.0123abcd.partial.tif.aux.xml",
            folder / ".change_polygons.4567cdef.partial.scratch.gpkg"]

    def cancelled_mid_pair(*args):
        folder.mkdir()
        for path in (*left, folder / "notes.txt"):
            path.write_bytes(b"")
        raise Cancelled("cancelled: the engine process was asked to stop")

    monkeypatch.setattr(many, "_on_this_machine", cancelled_mid_pair)
    with pytest.raises(Cancelled):
        detect_many([Pair("b", str(tmp_path / "pre.tif"), str(tmp_path / "post.tif"))], random_package,
                    tmp_path / "out")
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert summary(tmp_path / "out")["b"]["status"] == PAIR_PENDING
    # On a scheduler's cluster a cancel does not stop the pairs running there, whose files stay theirs.
    shutil.rmtree(folder)
    monkeypatch.setattr(many, "_on_scheduler", cancelled_mid_pair)
    with pytest.raises(Cancelled):
        detect_many([Pair("b", str(tmp_path / "pre.tif"), str(tmp_path / "post.tif"))], random_package,
                    tmp_path / "out", scheduler="tcp://127.0.0.1:8786")
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (*left, folder / "notes.txt"))


def test_the_local_cluster_s_layout():
    assert local_layout(2, []) == Layout(2, 1)  # a worker a core
    assert local_layout(8, [], threads=2) == Layout(4, 2)
    assert local_layout(16, [0, 1]) == Layout(2, 8, (0, 1))  # a worker a GPU, the cores shared
    # A worker's measured peak of 4 GiB (plus HEADROOM) where 10 GiB are free: two workers, the cores shared.
    assert local_layout(8, [], peak=4 * 2**30, memory=10 * 2**30) == Layout(2, 4)
    warnings = []
    assert local_layout(8, [], workers=4, peak=4 * 2**30, memory=10 * 2**30, warn=warnings.append) == Layout(4, 2)
    assert warnings == ["--workers 4: a worker's measured peak memory (4.00 GiB) with a quarter to spare fits 2 "
                        "time(s) in the 10.0 GiB available; a worker out of its share is restarted and its pair run "
                        "again, then failed"]  # as asked, with the warning
    assert local_layout(8, [], workers=2, peak=4 * 2**30, memory=10 * 2**30, warn=warnings.append) == Layout(2, 4)
    assert len(warnings) == 1  # two fit
    assert local_layout(8, [], pairs=3) == Layout(3, 2)  # no worker without a pair
    for asked, problem in (({"workers": 2, "threads": 2}, "more than this machine's 2 cores"),
                           ({"threads": 3}, "more than this machine's 2 cores"), ({"workers": 0}, "at least 1")):
        with pytest.raises(OptionError, match=problem):
            local_layout(2, [], **asked)
    with pytest.raises(OptionError, match="one GPU a worker, and this machine has 2"):
        local_layout(16, [0, 1], workers=3)


def test_a_pair_is_complete_while_its_record_matches(tmp_path):
    """The record names the model, the inputs as they were, the options and the outputs written: a change to
    the model, the inputs or the options, or a missing output, makes the pair one to run again; where it runs
    (threads, device) does not, and an output changed since (an analyst's edit) is named and kept."""
    for name in ("pre.tif", "post.tif"):
        (tmp_path / name).write_bytes(b"raster")
    pair = Pair("p", str(tmp_path / "pre.tif"), str(tmp_path / "post.tif"))

    def job(**options):
        return make_job(pair, tmp_path / "m.safetensors", "ab" * 32, tmp_path / "out", DetectOptions(**options), "gpkg")

    first = job()
    assert complete(first) is None  # nothing written yet
    for path in map(Path, (first["folder"] + "/change_probability.tif", first["folder"] + "/change_mask.tif",
                           first["folder"] + "/change_polygons.gpkg")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"output")
    write_record(first, identity(first), {"name": "p", "status": PAIR_DONE})
    assert complete(first) == ({"name": "p", "status": PAIR_DONE}, [])
    assert complete(job(threads=4, device="cuda")) is not None
    assert complete(job(min_area=5.0)) is None
    assert complete({**first, "sha256": "cd" * 32}) is None
    os.utime(tmp_path / "post.tif", ns=(1, 1))
    assert complete(first) is None
    write_record(first, identity(first), {"name": "p", "status": PAIR_DONE})
    assert complete(first) is not None
    (Path(first["folder"]) / "change_mask.tif").write_bytes(b"another")
    assert complete(first) == ({"name": "p", "status": PAIR_DONE}, ["change_mask.tif"])
    (Path(first["folder"]) / "change_mask.tif").unlink()
    assert complete(first) is None
    record = json.loads((Path(first["folder"]) / RECORD).read_text())  # JSON, readable
    (Path(first["folder"]) / "change_mask.tif").write_bytes(b"another")
    assert complete(first) is not None
    for other in ("null", "[]", json.dumps({**record, "row": None})):  # no record this engine wrote: run again
        (Path(first["folder"]) / RECORD).write_text(other)
        assert complete(first) is None


def test_the_summary_is_not_rewritten_after_every_pair(tmp_path):
    """2,000 pairs ending at once: the summary is written when the first ends, then not again until ten times
    its write's time has passed, when it is written with every row, though no pair ended since."""
    from osgeo import ogr

    from geochange.engine.many import Summary

    job = {"name": "p", "pre": "pre.tif", "post": "post.tif", "sha256": "ab" * 32}
    rows = [{**pair_row({**job, "name": f"p{i}"}, PAIR_DONE), "polygons": i} for i in range(2000)]
    summary = Summary(tmp_path)
    for i in range(len(rows)):
        summary.write(rows[:i + 1], now=False)
    written, deadline = summary.writes, time.monotonic() + 60
    assert 1 <= written < 50
    while summary.writes == written and time.monotonic() < deadline:
        time.sleep(0.05)
    source = ogr.Open(str(tmp_path / "summary.gpkg"))
    assert source.GetLayer(0).GetFeatureCount() == 2000
    with open(tmp_path / "summary.csv", encoding="utf-8") as f:
        assert len(list(csv.reader(f))) == 2001


def test_a_re_run_keeps_a_pair_whose_outputs_were_edited(tinycd_package, tmp_path):
    """A complete pair whose polygons changed after its run is kept, with a line naming the file; no cluster
    starts, as every pair is complete."""
    from geochange.engine.zoo import sha256

    for name in ("pre.tif", "post.tif"):
        (tmp_path / name).write_bytes(b"raster")
    pair = Pair("p", str(tmp_path / "pre.tif"), str(tmp_path / "post.tif"))
    job = make_job(pair, tinycd_package.resolve(), sha256(tinycd_package), tmp_path / "out", DetectOptions(), "gpkg")
    folder = Path(job["folder"])
    folder.mkdir(parents=True)
    for name in ("change_probability.tif", "change_mask.tif", "change_polygons.gpkg"):
        (folder / name).write_bytes(b"output")
    row = {**dict.fromkeys(("error", "polygons", "changed_area", "area_unit", "seconds", "footprint")),
           "name": "p", "status": PAIR_DONE, "pre": job["pre"], "post": job["post"], "model_sha256": job["sha256"]}
    write_record(job, identity(job), row)
    (folder / "change_polygons.gpkg").write_bytes(b"edited in QGIS")
    lines = Recorded()
    rows = detect_many([pair], tinycd_package, tmp_path / "out", progress=lines)
    assert [r["status"] for r in rows] == [PAIR_SKIPPED]
    assert "p: change_polygons.gpkg changed after the pair's run (edited?); kept as they are (--force runs the pair " \
           "again)" in lines.lines
    assert (folder / "change_polygons.gpkg").read_bytes() == b"edited in QGIS"


# --- QGIS ----------------------------------------------------------------------------------------------

def test_qgis_detect_changes_in_many_pairs(geochange_provider, dask_cluster, levir_crop, shared_data, tinycd_package,
                                           tmp_path, monkeypatch):
    """Two folders on this machine's cluster, then a CSV on the cluster the provider's setting names; the
    summary layer is loaded."""
    from qgis.core import QgsProject, QgsSettings, QgsVectorLayer, edit

    from geochange.qgis_plugin.many_algorithm import SCHEDULER_SETTING_KEY

    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    for date, landsat in (("pre", "pre_2000.tif"), ("post", "post_2003.tif")):
        (tmp_path / date).mkdir()
        (tmp_path / date / "levir.tif").symlink_to(levir_crop[date])
        (tmp_path / date / "landsat.tif").symlink_to(shared_data / "landsat_taizhou" / landsat)
    parameters = {"MODEL": str(tinycd_package), "PRE_BANDS": "1,2,3", "POST_BANDS": "1,2,3", "DEVICE": "cpu",
                  "THREADS": 1}
    before = set(QgsProject.instance().mapLayers())
    results = run_algorithm("geochange:detectmanypairs", {
        **parameters, "PRE_FOLDER": str(tmp_path / "pre"), "POST_FOLDER": str(tmp_path / "post"),
        "OUTPUT": str(tmp_path / "out")}, load=True)
    assert (results["DONE"], results["SKIPPED"], results["FAILED"]) == (2, 0, 0)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"levir", "landsat", "summary.gpkg", "summary.csv",
                                                             "summary.qml"}
    added = [QgsProject.instance().mapLayer(i) for i in set(QgsProject.instance().mapLayers()) - before]
    assert [(layer.name(), layer.featureCount(), layer.renderer().type()) for layer in added] == [
        ("pairs: change detection summary", 2, "categorizedSymbol")]
    assert sorted(f["status"] for f in added[0].getFeatures()) == [PAIR_DONE, PAIR_DONE]

    address, _ = dask_cluster
    table = tmp_path / "pairs.csv"
    table.write_text("name,pre,post\nlevir,pre/levir.tif,post/levir.tif\n")  # the polygons name these files
    QgsSettings().setValue(SCHEDULER_SETTING_KEY, address)
    try:
        on_cluster = run_algorithm("geochange:detectmanypairs", {**parameters, "PAIRS": str(table),
                                                                 "OUTPUT": str(tmp_path / "cluster")})
    finally:
        QgsSettings().remove(SCHEDULER_SETTING_KEY)
    assert (on_cluster["DONE"], on_cluster["FAILED"]) == (1, 0)
    for name in ("change_probability.tif", "change_mask.tif", "change_polygons.gpkg"):
        assert filecmp.cmp(tmp_path / "out" / "levir" / name, tmp_path / "cluster" / "levir" / name, shallow=False)

    # An analyst deletes a false alarm in QGIS: the re-run keeps the pair, edit and all.
    polygons = QgsVectorLayer(str(tmp_path / "out" / "levir" / "change_polygons.gpkg"), "levir", "ogr")
    count = polygons.featureCount()
    with edit(polygons):
        polygons.deleteFeature(next(polygons.getFeatures()).id())
    del polygons
    again = run_algorithm("geochange:detectmanypairs", {
        **parameters, "PRE_FOLDER": str(tmp_path / "pre"), "POST_FOLDER": str(tmp_path / "post"),
        "OUTPUT": str(tmp_path / "out")})
    assert (again["DONE"], again["SKIPPED"], again["FAILED"]) == (0, 2, 0)
    polygons = QgsVectorLayer(str(tmp_path / "out" / "levir" / "change_polygons.gpkg"), "levir", "ogr")
    assert polygons.featureCount() == count - 1


def test_qgis_detect_many_refuses_options_before_any_cluster(geochange_provider, tinycd_package, tmp_path):
    """Options the engine would refuse, refused by the dialog's check: no engine, no cluster, no folder."""
    from qgis.core import QgsProcessingException

    for name in ("pre", "post"):
        (tmp_path / name).mkdir()
    parameters = {"MODEL": str(tinycd_package), "PRE_FOLDER": str(tmp_path / "pre"),
                  "POST_FOLDER": str(tmp_path / "post"), "OUTPUT": str(tmp_path / "out"), "DEVICE": "cpu"}
    for changed, message in (({"PRE_SCALE": 0}, "PRE_SCALE must be"),
                             ({"TILE_SIZE": 128, "OVERLAP": 128}, r"OVERLAP must be in \[0, tile\)")):
        with pytest.raises(QgsProcessingException, match=message):
            run_algorithm("geochange:detectmanypairs", {**parameters, **changed})
    assert not (tmp_path / "out").exists()


def test_the_workers_import_check_imports_nothing_from_the_current_folder(tmp_path, monkeypatch):
    """Its ``python -c`` imported json first from the current folder (a downloaded dataset's, where an analyst runs
    detect-many), running a planted json.py."""
    from geochange.engine.many import _check_workers_import_this_engine

    (tmp_path / "json.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    _check_workers_import_this_engine()
    assert not (tmp_path / "ran").exists()
