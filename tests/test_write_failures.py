"""Outputs on a full or read-only disk, killed runs and two runs into one folder: every failure is one
line naming the file, earlier outputs stay as they were and nothing is left behind (issue 14, 3, 7, 9).
The disks are small tmpfs mounts, which need root: the tests skip elsewhere."""
import contextlib
import gc
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from geochange.engine.cli import main
from geochange.engine.detect import detect
from geochange.engine.errors import Cancelled, GeoChangeError
from geochange.engine.grid import Grid
from geochange.engine.many import write_summary
from geochange.engine.outputs import ChangeWriter, StagedRaster
from geochange.engine.pair_task import SUMMARY_FIELDS
from geochange.engine.progress import Progress
from geochange.engine.vectorize import PolygonWriter, change_polygons, write_polygons

GEOCHANGE = [sys.executable, "-m", "geochange.engine"]
EARLIER = {"p.tif": b"earlier probability", "m.tif": b"earlier mask", "c.gpkg": b"earlier polygons"}
GRID = Grid(rasterio.crs.CRS.from_epsg(32614), from_origin(630000, 3340000, 0.5, 0.5), 700, 600)


@contextlib.contextmanager
def _tmpfs(folder, options):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill ({mounted.stderr.strip()}): needs root and mount rights")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def disk(tmp_path):
    """An empty 8 MB file system."""
    with _tmpfs(tmp_path / "disk", "size=8m") as folder:
        yield folder


def fill(disk):
    """Take every free byte of ``disk`` with a file; returns it."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(2**16))
    assert os.statvfs(disk).f_bavail == 0
    return filler


@pytest.fixture
def dropped_errors(monkeypatch) -> list:
    """The exceptions Python ignores from here on (raised where an object is dropped: a failing flush)."""
    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    return ignored


def printed_later(capfd, dropped_errors) -> tuple[str, list[str]]:
    """What was printed on stderr and what Python ignored once every dropped object is collected: ("", []) where
    every file was closed before its error left."""
    gc.collect()
    return capfd.readouterr().err, [str(hook.exc_value) for hook in dropped_errors]


def open_files() -> list[str]:
    """The paths of this process's open files."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own, closed since
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
    return paths


def detect_into(out, levir_crop, package, **options):
    return detect(levir_crop["pre"], levir_crop["post"], package, probability=out / "p.tif", mask=out / "m.tif",
                  polygons=out / "c.gpkg", tile=128, overlap=16, device="cpu", readers=0, **options)


def earlier_outputs(out):
    out.mkdir()
    for name, content in EARLIER.items():
        (out / name).write_bytes(content)


def one_line_error(capsys, *argv):
    """Run the CLI in this process: its exit status must be 2 and its error one line, no traceback."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]  # after the progress bar, if any
    assert line.startswith("geochange: error: ")
    return line


@pytest.fixture(params=[False, True], ids=["gdal-error-codes", "gdal-exceptions"])
def gdal_exceptions(request):
    """GDAL's Python bindings report errors by return codes, or raise where anything in the process (QGIS,
    a user's script) turned exceptions on: writes must fail loudly either way."""
    from osgeo import gdal, ogr

    before = [module.GetUseExceptions() for module in (gdal, ogr)]
    for module in (gdal, ogr):
        module.UseExceptions() if request.param else module.DontUseExceptions()
    yield request.param
    for module, used in reversed(list(zip((gdal, ogr), before))):  # GDAL undoes them in reverse order only
        module.UseExceptions() if used else module.DontUseExceptions()


def test_a_disk_full_for_part_of_a_run_fails_it_and_keeps_the_earlier_outputs(disk, levir_crop, tinycd_package,
                                                                               gdal_exceptions, monkeypatch):
    """The disk fills after the first batch and is freed once polygons have been written onto it (in the
    writer thread): those polygons are lost, so the run must fail, not report success with a GeoPackage
    missing them."""
    out = disk / "out"
    earlier_outputs(out)

    class FullForAWhile(Progress):
        filler = None

        def update(self, done, total):
            if done and self.filler is None:
                self.filler = fill(disk)

    progress = FullForAWhile()
    write = PolygonWriter.write

    def on_a_full_disk(writer, polygons):
        try:
            return write(writer, polygons)
        finally:
            if polygons and progress.filler is not None:
                progress.filler.unlink(missing_ok=True)

    monkeypatch.setattr(PolygonWriter, "write", on_a_full_disk)
    try:
        with pytest.raises(GeoChangeError, match="no space left") as error:
            detect_into(out, levir_crop, tinycd_package, progress=progress)
    finally:
        if progress.filler is not None:
            progress.filler.unlink(missing_ok=True)
    assert str(out / "c.gpkg") in str(error.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == EARLIER  # nothing replaced, nothing left over


def test_a_disk_full_at_the_end_fails_the_run_and_keeps_the_earlier_outputs(disk):
    out = disk / "out"
    earlier_outputs(out)
    writer = ChangeWriter(GRID, probability=out / "p.tif", mask=out / "m.tif", polygons=out / "c.gpkg",
                          threshold=0.5)
    probability = np.zeros((GRID.height, GRID.width), np.float32)
    probability[100:200, 100:300] = 0.9
    writer.write_rows(0, probability, np.ones(probability.shape, bool))
    filler = fill(disk)
    with pytest.raises(GeoChangeError, match="no space left") as error:
        writer.close()
    filler.unlink()
    assert str(error.value).startswith(tuple(str(out / name) for name in EARLIER))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == EARLIER


@pytest.mark.parametrize("dtype,nodata,options", [("float32", -1.0, {"average": True, "compress": "NONE"}),
                                                  ("uint8", 127, {"average": False, "compress": "ZSTD"})])
def test_a_staged_raster_on_a_full_disk_fails_when_it_is_finished(disk, dtype, nodata, options):
    """Rows go to GDAL's block cache: the disk being full shows only when they are flushed."""
    staged = StagedRaster(disk / "s.tif", GRID, dtype, nodata, **options)
    values = np.random.default_rng(0).integers(0, 255, (GRID.height, GRID.width)).astype(dtype)
    staged.write(0, values, np.ones(values.shape, bool))
    fill(disk)
    with pytest.raises(GeoChangeError, match=f"{disk / 's.tif'}: no space left"):
        staged.finish()


@pytest.mark.parametrize("grid", [GRID, Grid(GRID.crs, GRID.transform, 256, 256)], ids=["overviews", "none"])
def test_a_staged_raster_that_a_full_disk_refuses_closes_its_file(grid, disk, gdal_exceptions, capfd, dropped_errors):
    """GDAL fails to write the file at creation: the half-made file is closed there, not when Python drops the error
    later, where GDAL would print what its flush could not write after the run's one-line error (or Python an
    ignored exception, where GDAL's exceptions are on)."""
    fill(disk)
    with pytest.raises(GeoChangeError, match=f"{disk / 's.tif'}: no space left") as error:
        StagedRaster(disk / "s.tif", grid, "float32", -1.0, average=True, compress="NONE")
    capfd.readouterr()
    del error  # and with it the frames of the failed creation
    assert printed_later(capfd, dropped_errors) == ("", [])


@pytest.mark.parametrize("free", [0, 2**14, 2**16, 2**18])
def test_a_run_on_a_full_disk_leaves_no_file_open(free, disk, levir_crop, tinycd_package, capfd, gdal_exceptions,
                                                  dropped_errors):
    """Whichever output the disk refuses first (the probability, the polygons), its error is the run's last line:
    every file the run opened is closed by then (GDAL would print its failing flushes on stderr after it)."""
    filler = fill(disk)
    os.truncate(filler, filler.stat().st_size - free)
    line = one_line_error(capfd, "detect", levir_crop["pre"], levir_crop["post"], "--model", tinycd_package,
                          "--device", "cpu", "--tile", "128", "--out", disk / "out")
    assert "no space left" in line and printed_later(capfd, dropped_errors) == ("", [])


@pytest.mark.parametrize("free", [2**15, 2**17])
def test_a_summary_on_a_full_disk_fails_and_leaves_no_file_open(free, disk, gdal_exceptions, capfd, dropped_errors):
    """detect-many's summary GeoPackage refused midway: its file is closed before the error leaves, not when the
    error is dropped (GDAL would print its failing flush later), and nothing is left."""
    square = "POLYGON ((0 0, 1 0, 1 1, 0 1, 0 0))"
    rows = [{**dict.fromkeys(SUMMARY_FIELDS), "name": f"pair {i}", "footprint": square} for i in range(20000)]
    (disk / "out").mkdir()
    filler = fill(disk)
    os.truncate(filler, filler.stat().st_size - free)
    with pytest.raises(GeoChangeError, match=f"{disk / 'out' / 'summary.gpkg'}: no space left") as error:
        write_summary(rows, disk / "out")
    assert [path for path in open_files() if path.startswith(str(disk))] == []
    assert list((disk / "out").iterdir()) == []
    capfd.readouterr()
    del error
    assert printed_later(capfd, dropped_errors) == ("", [])


def test_detect_many_cancelled_on_a_full_disk_says_it_was_cancelled(disk, tinycd_package, tmp_path, monkeypatch):
    """A cancel arrives while the disk is full: the summary's last write fails, and the run reports the cancel,
    not the disk; the summary written at the start stays, with no temporary beside it."""
    from geochange.engine import many
    from geochange.engine.pairs import Pair

    def cancelled_on_a_full_disk(*args):
        fill(disk)
        raise Cancelled("cancelled: the engine process was asked to stop")

    monkeypatch.setattr(many, "_on_this_machine", cancelled_on_a_full_disk)
    with pytest.raises(Cancelled):
        many.detect_many([Pair("p", str(tmp_path / "pre.tif"), str(tmp_path / "post.tif"))], tinycd_package,
                         disk / "out")
    assert sorted(path.name for path in (disk / "out").iterdir()) == ["summary.csv", "summary.gpkg"]


@pytest.mark.parametrize("name", ["c.gpkg", "c.geojson", "c.shp"])
def test_polygons_on_a_full_disk_fail_in_every_format(disk, name):
    """GeoJSON's writer says nothing when its writes fail: the file is read back."""
    mask = np.random.default_rng(0).random((200, 200)) > 0.7
    polygons = change_polygons(mask, mask.astype(np.float32), GRID.transform, GRID.crs)
    assert len(polygons) > 500
    fill(disk)
    with pytest.raises(GeoChangeError, match=f"{disk / name}: no space left"):
        write_polygons(polygons, disk / name, GRID.crs)
    assert [p.name for p in disk.iterdir()] == ["filler"]


def test_gdal_refusing_a_raster_too_large_for_the_disk_is_a_one_line_error(disk, tmp_path, tinycd_package, capsys):
    """GDAL estimates the size of an uncompressed GeoTIFF before it creates it (here 1.6 GB)."""
    for name in ("pre", "post"):
        with rasterio.open(tmp_path / f"{name}.tif", "w", driver="GTiff", width=20000, height=20000, count=3,
                           dtype="uint8", crs=GRID.crs, transform=GRID.transform, tiled=True, sparse_ok=True):
            pass  # never written: a sparse file of a few kilobytes
    line = one_line_error(capsys, "detect", tmp_path / "pre.tif", tmp_path / "post.tif", "--model", tinycd_package,
                          "--out", disk / "out", "--device", "cpu")
    assert f"{disk / 'out' / 'change_probability.tif'}: no space left" in line
    assert list(disk.iterdir()) == []  # the folder the run made went with it


def test_cli_write_failures_are_one_line_errors(disk, tmp_path, levir_crop, tinycd_package, capsys):
    pair = [levir_crop["pre"], levir_crop["post"], "--model", tinycd_package, "--device", "cpu", "--tile", "128"]
    (tmp_path / "a_file").write_text("")
    assert "a file is in the way" in one_line_error(capsys, "detect", *pair, "--out", tmp_path / "a_file" / "out")
    assert "a file is in the way" in one_line_error(capsys, "detect", *pair, "--out", tmp_path / "a_file")

    with _tmpfs(tmp_path / "read_only", "size=1m,ro") as read_only:
        assert "Read-only file system" in one_line_error(capsys, "detect", *pair, "--out", read_only)
        assert "Read-only file system" in one_line_error(capsys, "detect", *pair, "--out", read_only / "out")

    fill(disk)
    line = one_line_error(capsys, "detect", *pair, "--out", disk / "out")
    assert str(disk / "out") in line and "no space left" in line
    assert [p.name for p in disk.iterdir()] == ["filler"]


def test_cli_evaluate_json_on_a_full_disk_is_a_one_line_error(disk, tmp_path, levir_crop, tinycd_package, capsys):
    for folder, source in (("A", "pre"), ("B", "post"), ("label", "label")):
        (tmp_path / "data" / folder).mkdir(parents=True)
        with rasterio.open(levir_crop[source]) as src:
            profile = dict(src.profile, width=64, height=64, transform=src.window_transform(((0, 64), (0, 64))))
            with rasterio.open(tmp_path / "data" / folder / "a.tif", "w", **profile) as dst:
                dst.write(src.read(window=((0, 64), (0, 64))))
    fill(disk)
    line = one_line_error(capsys, "evaluate", "--model", tinycd_package, "--data", tmp_path / "data", "--device",
                          "cpu", "--json", disk / "metrics.json")
    assert f"{disk / 'metrics.json'}: no space left" in line
    assert [p.name for p in disk.iterdir()] == ["filler"]


def test_a_failed_run_removes_the_folders_it_made(tmp_path, levir_crop, tinycd_package):
    class CancelAtOnce(Progress):
        def cancelled(self):
            return True

    with pytest.raises(Cancelled):
        detect_into(tmp_path / "new" / "out", levir_crop, tinycd_package, progress=CancelAtOnce())
    assert list(tmp_path.iterdir()) == []


def test_the_next_run_removes_what_a_killed_run_left(tmp_path, levir_crop, tinycd_package):
    out = tmp_path / "out"
    command = [*GEOCHANGE, "detect", str(levir_crop["pre"]), str(levir_crop["post"]), "--model", str(tinycd_package),
               "--out", str(out), "--device", "cpu"]
    run = subprocess.Popen([*command, "--tile", "64", "--overlap", "16", "--batch", "1", "--threads", "1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob(".*.partial.*")) and time.monotonic() < deadline:
        time.sleep(0.01)  # until the outputs are being written under temporary names
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL and list(out.glob(".*.partial.*"))
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in out.iterdir()) == ["change_mask.tif", "change_polygons.gpkg",
                                                     "change_probability.tif"]


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, levir_crop, tinycd_package):
    """A run in this process holds the folder (its progress waits); one in another process is refused
    with one line, and the first then ends well."""
    out, holding, go_on = tmp_path / "out", threading.Event(), threading.Event()

    class Waits(Progress):
        def update(self, done, total):
            if done:
                holding.set()
                go_on.wait(timeout=300)

    first = {}
    thread = threading.Thread(target=lambda: first.update(result=detect_into(out, levir_crop, tinycd_package,
                                                                              progress=Waits())))
    thread.start()
    try:
        assert holding.wait(timeout=120)
        second = subprocess.run([*GEOCHANGE, "detect", str(levir_crop["pre"]), str(levir_crop["post"]), "--model",
                                 str(tinycd_package), "--out", str(out), "--device", "cpu"],
                                capture_output=True, text=True, timeout=600)
    finally:
        go_on.set()
        thread.join(timeout=300)
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip() == (f"geochange: error: {out}: another GeoChange run is writing its outputs into "
                                     "this folder; wait until it ends or choose another folder")
    assert "result" in first
    assert sorted(p.name for p in out.iterdir()) == ["c.gpkg", "m.tif", "p.tif"]



