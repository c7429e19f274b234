"""Engine v1 end to end: the CLI on the real LEVIR tile, and clear errors on bad pairs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import rasterio
from osgeo import ogr
from rasterio.transform import from_origin

from geochange.engine.contracts import MASK_NODATA, PROBABILITY_NODATA
from geochange.engine.detect import detect, prepare, write_outputs
from geochange.engine.errors import Cancelled, GeoChangeError, RasterError
from geochange.engine.grid import PairReader
from geochange.engine.metrics import confusion, scores
from geochange.engine.outputs import ChangeWriter
from geochange.engine.options import DetectOptions
from geochange.engine.progress import Progress
from geochange.engine.stream import stream_rows

GEOCHANGE = [sys.executable, "-m", "geochange.engine"]


@pytest.fixture(scope="module")
def levir_run(tinycd_package, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("detect")
    tile = shared_data / "levir_tile_georef"
    run = subprocess.run([*GEOCHANGE, "detect", str(tile / "pre.tif"), str(tile / "post.tif"),
                          "--model", str(tinycd_package), "--out", str(out), "--tile", "512",
                          "--overlap", "64", "--batch", "2", "--device", "cpu"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return out, run.stdout, tile


def test_cli_detect_on_levir_tile_matches_label(levir_run):
    out, stdout, tile = levir_run
    assert sorted(p.name for p in out.iterdir()) == ["change_mask.tif", "change_polygons.gpkg",
                                                     "change_probability.tif"]
    with rasterio.open(out / "change_mask.tif") as m, rasterio.open(tile / "label.tif") as lab, \
            rasterio.open(tile / "pre.tif") as pre:
        mask = m.read(1)
        assert m.crs == pre.crs and m.transform == pre.transform and m.nodata == MASK_NODATA
        assert set(np.unique(mask)) <= {0, 255}
        assert m.profile["tiled"] and m.profile["compress"] == "zstd"
        f1 = scores(confusion(mask == 255, lab.read(1) > 0))["f1"]
    assert f1 >= 0.92
    with rasterio.open(out / "change_probability.tif") as p:
        assert p.profile["tiled"] and p.profile["compress"] == "zstd" and p.overviews(1)
        prob = p.read(1)
        assert p.dtypes[0] == "float32" and p.nodata == PROBABILITY_NODATA
        assert 0.0 <= prob.min() and prob.max() <= 1.0
        half = (p.height // 2, p.width // 2)  # the overview, built as the rows came, read as it is
        np.testing.assert_allclose(p.read(1, out_shape=half),
                                   prob.reshape(half[0], 2, half[1], 2).mean((1, 3)), atol=1e-6)
    np.testing.assert_array_equal(mask == 255, prob > 0.5)


def test_polygons_read_back_and_summary_agrees(levir_run):
    out, stdout, _ = levir_run
    source = ogr.Open(str(out / "change_polygons.gpkg"))
    layer = source.GetLayer()
    count = layer.GetFeatureCount()
    assert count > 50
    total, ids = 0.0, set()
    for feature in layer:
        assert 0.5 <= feature.GetField("max_prob") <= 1.0
        assert feature.GetField("mean_prob") <= feature.GetField("max_prob")
        assert (feature.GetField("pre"), feature.GetField("post")) == ("pre.tif", "post.tif")
        ids.add(feature.GetField("id"))
        total += feature.GetField("area_m2")
    assert ids == set(range(1, count + 1))
    assert f"{count} change polygons, {total:,.0f} m2 changed" in stdout


@pytest.mark.parametrize("name, files", [("c.shp", {"c.shp", "c.shx", "c.dbf", "c.prj", "c.cpg"}),
                                         ("c.geojson", {"c.geojson"})])
def test_polygons_as_shapefile_and_geojson(tmp_path, random_package, name, files):
    data = np.random.default_rng(0).integers(0, 255, (3, 96, 96), dtype=np.uint8)
    pre, post = write_raster(tmp_path / "a.tif", data), write_raster(tmp_path / "b.tif", data[::-1].copy())
    out = tmp_path / "out"
    result = detect(pre, post, random_package, probability=out / "p.tif", mask=out / "m.tif",
                    polygons=out / name, threshold=0.0)  # every pixel changed: one polygon
    assert {p.name for p in out.iterdir()} == files | {"p.tif", "m.tif"}
    source = ogr.Open(str(out / name))
    layer = source.GetLayer()
    assert layer.GetSpatialRef().GetAuthorityCode(None) == "32614"
    (feature,) = list(layer)
    fields = {k: feature.GetField(k) for k in ("id", "area_m2", "mean_prob", "max_prob", "pre", "post")}
    assert fields["id"] == 1 and fields["area_m2"] == pytest.approx(96 * 96 * 0.25, rel=1e-3)
    assert (fields["pre"], fields["post"]) == ("a.tif", "b.tif") and result.polygon_count == 1


def write_raster(path, data, crs="EPSG:32614", transform=from_origin(630000, 3340000, 0.5, 0.5), nodata=None):
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype.name, crs=crs, transform=transform, nodata=nodata) as dst:
        dst.write(data)
    return path


def outputs(folder):
    return {"probability": folder / "p.tif", "mask": folder / "m.tif", "polygons": folder / "c.gpkg"}


def test_pair_without_overlap_names_both_footprints(tmp_path, random_package):
    data = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    pre = write_raster(tmp_path / "a.tif", data)
    post = write_raster(tmp_path / "b.tif", data, crs="EPSG:4326", transform=from_origin(-90.0, 30.2, 1e-5, 1e-5))
    with pytest.raises(RasterError) as err:
        detect(pre, post, random_package, **outputs(tmp_path / "out"))
    message = str(err.value)
    assert "do not overlap" in message
    assert "EPSG:32614" in message and "EPSG:4326" in message and "a.tif" in message and "b.tif" in message
    assert "630000.0" in message and "-90.0" in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_wrong_band_count_and_corrupt_file(tmp_path, random_package):
    rgb = np.zeros((3, 32, 32), np.uint8)
    pre = write_raster(tmp_path / "a.tif", rgb)
    two_bands = write_raster(tmp_path / "b.tif", rgb[:2])
    with pytest.raises(RasterError, match="b.tif: the post image has 2 band"):
        detect(pre, two_bands, random_package, **outputs(tmp_path))
    opaque = np.full((1, 32, 32), 255, np.uint8)  # GDAL takes a 4th uint8 band as alpha
    four_bands = write_raster(tmp_path / "c.tif", np.concatenate([rgb, opaque]))
    with pytest.raises(RasterError, match=r"band\(s\) \[5\] do not exist"):
        detect(pre, four_bands, random_package, **outputs(tmp_path), post_bands=[1, 2, 5])
    with pytest.raises(RasterError, match="2 post band"):
        detect(pre, four_bands, random_package, **outputs(tmp_path), post_bands=[1, 2])
    result = detect(pre, four_bands, random_package, **outputs(tmp_path / "ok"), post_bands=[3, 2, 1])
    assert result.mask.exists()
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(pre.read_bytes()[:300])
    with pytest.raises(RasterError, match="corrupt.tif"):
        detect(pre, corrupt, random_package, **outputs(tmp_path))


@pytest.mark.parametrize("kind", ["alpha", "mask band"])
def test_an_alpha_band_or_a_mask_band_marks_nodata(tmp_path, random_package, kind):
    data = np.random.default_rng(0).integers(1, 255, (3, 96, 96), dtype=np.uint8)
    pre = write_raster(tmp_path / "a.tif", data)
    opaque = np.full((96, 96), 255, np.uint8)
    opaque[:, :20] = 0  # the left 20 columns are nodata
    if kind == "alpha":
        post = write_raster(tmp_path / "b.tif", np.concatenate([data, opaque[None]]))
        with rasterio.open(post) as src:
            assert src.colorinterp[3] == rasterio.enums.ColorInterp.alpha
    else:
        post = write_raster(tmp_path / "b.tif", data)
        with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(post, "r+") as dst:
            dst.write_mask(opaque)
    result = detect(pre, post, random_package, **outputs(tmp_path / "o"), tile=64, overlap=16, threshold=0.0,
                    post_bands=[1, 2, 3])
    with rasterio.open(result.mask) as m:
        assert (m.read(1)[:, :20] == MASK_NODATA).all() and (m.read(1)[:, 20:] == 255).all()


@pytest.mark.parametrize("readers", [0, 2])
def test_a_file_cut_short_after_its_header_is_a_clear_error_and_leaves_nothing(shared_data, tmp_path,
                                                                                random_package, readers):
    tile = shared_data / "levir_tile_georef"
    data = (tile / "pre.tif").read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[:len(data) * 6 // 10])  # its header and first tiles: it opens, then fails
    for post in ("post.tif", "post_utm14n_0.6m_shifted.tif"):  # read on its own lattice, then warped
        out = tmp_path / post
        with pytest.raises(RasterError, match="cut.tif: cannot read pixels, the file is corrupt"):
            detect(cut, tile / post, random_package, **outputs(out), grid="post", tile=256, overlap=32,
                   readers=readers)
        assert not out.exists() or not any(out.iterdir())


def test_cli_refuses_an_overlap_as_large_as_the_tile_and_follows_threads(shared_data, tmp_path, random_package):
    tile = shared_data / "levir_tile_georef"
    run = subprocess.run([*GEOCHANGE, "detect", str(tile / "pre.tif"), str(tile / "post.tif"), "--model",
                          str(random_package), "--out", str(tmp_path), "--tile", "64"], capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "geochange: error: --overlap must be in [0, tile) = [0, 64), not 64" in run.stderr
    run = subprocess.run([*GEOCHANGE, "detect", str(tile / "pre.tif"), str(tile / "post.tif"), "--model",
                          str(random_package), "--out", str(tmp_path), "--batch", "0"], capture_output=True, text=True)
    assert run.returncode == 2 and "error: --batch must be a whole number at least 1 window, not 0" in run.stderr
    with pytest.raises(GeoChangeError, match="--batch must be a whole number at least 1 window, not 0"):
        detect(tile / "pre.tif", tile / "post.tif", random_package, **outputs(tmp_path / "api"), batch=0)
    with pytest.raises(GeoChangeError, match="--resolution must be a number above 0 or model, not -1"):
        detect(tile / "pre.tif", tile / "post.tif", random_package, **outputs(tmp_path / "api"), resolution=-1.0)
    assert not (tmp_path / "api").exists() or not any((tmp_path / "api").iterdir())
    run = subprocess.run([*GEOCHANGE, "detect", str(tile / "pre.tif"), str(tile / "post.tif"), "--model",
                          str(random_package), "--out", str(tmp_path), "--tile", "512", "--threads", "1"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "windows of 512x512 px on cpu, 1 thread\n" in run.stdout


def test_nodata_everywhere_is_an_error_and_nodata_edges_stay_nodata(tmp_path, random_package):
    data = np.random.default_rng(0).integers(1, 255, (3, 96, 96), dtype=np.uint8)
    pre = write_raster(tmp_path / "a.tif", data, nodata=0)
    empty = write_raster(tmp_path / "e.tif", np.zeros_like(data), nodata=0)
    with pytest.raises(RasterError, match="nodata everywhere"):
        detect(pre, empty, random_package, **outputs(tmp_path / "o1"))
    holed = data.copy()
    holed[:, :, :20] = 0
    post = write_raster(tmp_path / "b.tif", holed, nodata=0)
    result = detect(pre, post, random_package, **outputs(tmp_path / "o2"), tile=64, overlap=16, threshold=0.0)
    with rasterio.open(result.mask) as m, rasterio.open(result.probability) as p:
        assert (m.read(1)[:, :20] == MASK_NODATA).all() and (m.read(1)[:, 20:] == 255).all()
        assert (p.read(1)[:, :20] == PROBABILITY_NODATA).all()
    # Windows without a valid pixel never reach the model: of 2 x 4 windows, the 4 right of column 96.
    wide = np.concatenate([data, data], axis=2)  # 96 x 192 px
    half = write_raster(tmp_path / "d.tif", np.where(np.arange(192) < 96, wide, 0).astype(np.uint8), nodata=0)
    setup = prepare(write_raster(tmp_path / "c.tif", wide, nodata=0), half, random_package,
                    DetectOptions(tile=64, overlap=16))
    seen = []
    read = setup.reader()
    for _ in stream_rows(lambda pre, post, valid: seen.append(valid) or np.zeros(valid.shape, np.float32),
                         setup.plan, read):
        pass
    read.close()
    assert len(setup.plan) == 8 and sum(len(v) for v in seen) == 4 and all(v.any() for b in seen for v in b)


def test_reader_and_writer_threads_give_what_the_main_thread_gives(shared_data, tmp_path, random_package):
    """A CPU model reads and writes in the main thread by default; threads (the GPU's way) must not
    change a pixel or a polygon."""
    tile = shared_data / "levir_tile_georef"
    runs = [detect(tile / "pre.tif", tile / "post.tif", random_package, **outputs(tmp_path / str(readers)),
                   tile=256, overlap=32, batch=3, readers=readers, threshold=0.45) for readers in (0, 3)]
    with rasterio.open(runs[0].probability) as a, rasterio.open(runs[1].probability) as b:
        assert np.array_equal(a.read(1), b.read(1))
    with rasterio.open(runs[0].mask) as a, rasterio.open(runs[1].mask) as b:
        assert np.array_equal(a.read(1), b.read(1)) and (a.read(1) == 255).any()
    assert runs[0].polygon_count == runs[1].polygon_count > 0
    assert runs[0].changed_area_m2 == pytest.approx(runs[1].changed_area_m2)


def test_peak_memory_follows_the_raster_width_not_its_height(tmp_path, random_package):
    """Python's and numpy's allocations (tracemalloc) over a whole streamed run, 8x the height."""
    import tracemalloc

    def differences(pre, post, valid):  # cheap and local: changes where the first bands differ
        return np.abs(pre[:, 0].astype(np.float32) - post[:, 0]) / 255

    peaks = []
    for height in (512, 4096):
        rng = np.random.default_rng(0)  # blocks of 16 x 16 px: changed regions, some across seams
        pre, post = (write_raster(tmp_path / f"{name}{height}.tif", np.kron(
            rng.integers(0, 255, (3, height // 16, 16), np.uint8), np.ones((1, 16, 16), np.uint8))) for name in "ab")
        setup = prepare(pre, post, random_package, DetectOptions(tile=128, overlap=16))
        setup.predictor = differences
        read = setup.reader()
        tracemalloc.start()
        try:
            write_outputs(setup, stream_rows(differences, setup.plan, read), **outputs(tmp_path / str(height)))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
            read.close()
    assert peaks[1] < 1.2 * peaks[0], peaks  # measured: 2.58 and 2.62 MB


def test_gdal_block_cache_follows_the_raster_width_not_its_height(tmp_path, random_package):
    from osgeo import gdal

    def cache_for(width, height, readers=0, sized=True):
        path = tmp_path / f"{width}x{height}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                           crs="EPSG:32614", transform=from_origin(630000, 3340000, 0.5, 0.5), tiled=True,
                           blockxsize=512, blockysize=512, compress="deflate") as dst:
            dst.write(np.zeros((3, height, width), np.uint8))
        twin = shutil.copy(path, path.with_name(f"twin_{path.name}"))
        prepare(path, twin, random_package, DetectOptions(device="cpu"), readers=readers, size_gdal_cache=sized)
        return gdal.GetCacheMax()

    before = gdal.GetCacheMax()
    try:
        gdal.SetCacheMax(123 * 2**20)
        assert cache_for(4096, 1024, sized=False) == 123 * 2**20  # unasked, the process's cache is left alone
        assert cache_for(4096, 1024) == 256 * 2**20  # the floor: a 4096 px wide run uses about 53 MB
        wide = cache_for(32768, 1024)
        # Both dates' blocks under a tile row (192 MB) and the outputs' under two block rows (213 MB), and a
        # quarter more: about 507 MB.
        assert wide == cache_for(32768, 64) and 480 * 2**20 < wide < 530 * 2**20
        # Each reader thread has its own datasets: four hold four times the dates' 192 MB.
        assert 1200 * 2**20 < cache_for(32768, 64, readers=4) < 1250 * 2**20
    finally:
        gdal.SetCacheMax(before)


@pytest.mark.parametrize("readers", [0, 2])
def test_cancel_leaves_no_output(tmp_path, random_package, readers):
    data = np.random.default_rng(0).integers(0, 255, (3, 200, 200), dtype=np.uint8)
    pre, post = write_raster(tmp_path / "a.tif", data), write_raster(tmp_path / "b.tif", data[::-1].copy())

    class CancelOnceUnderWay(Progress):
        percent = 0.0

        def update(self, done, total):
            self.percent = 100 * done / total

        def cancelled(self):
            return self.percent > 0

    out, progress = tmp_path / "out", CancelOnceUnderWay()
    with pytest.raises(Cancelled):
        detect(pre, post, random_package, **outputs(out), tile=64, overlap=16, batch=2, readers=readers,
               progress=progress)
    assert not out.exists() or list(out.iterdir()) == []
    # The cancel came before the second batch: the first's 2 of 16 windows are 95 % of the run's time here.
    assert 0 < progress.percent < 100 * 3 / 16


def test_options_and_rasters_are_checked_before_the_model_is_made_ready(tmp_path, random_package, monkeypatch):
    """An overlap not under the model's tile, dates apart, a band count the model does not take: each was refused
    only once the predictor was made, after an OpenVINO export or a compile (minutes at an analyst's first run)."""
    from geochange.engine.errors import OptionError

    def made(*args, **kwargs):
        raise AssertionError("the predictor was made before the inputs were checked")

    monkeypatch.setattr("geochange.engine.detect.Predictor", made)
    data = np.random.default_rng(0).integers(0, 255, (3, 96, 96), dtype=np.uint8)
    pre, post = write_raster(tmp_path / "a.tif", data), write_raster(tmp_path / "b.tif", data)
    apart = write_raster(tmp_path / "apart.tif", data, transform=from_origin(640000, 3340000, 0.5, 0.5))
    grey = write_raster(tmp_path / "grey.tif", data[:1])
    for options, paths, refusal in (({"overlap": 600}, (pre, post), OptionError),
                                    ({}, (pre, apart), RasterError), ({}, (grey, post), RasterError)):
        with pytest.raises(refusal):
            prepare(*paths, random_package, DetectOptions.of(options))


def test_the_cli_gives_sigterm_back_once_its_command_is_over(monkeypatch, capsys):
    """Its handler stayed (the engine's command line, the trainer's): a SIGTERM during Python's exit, the outputs
    complete, raised there, printed a traceback and left the status 0."""
    from geochange.engine.cli import main

    from geochange.trainer.cli import main as trainer_main

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(sys, "argv", ["geochange", "zoo"])
    assert main() == 0
    assert signal.getsignal(signal.SIGTERM) is before
    monkeypatch.setattr(sys, "argv", ["geochange-trainer", "train", "no-such-config.yaml"])
    assert trainer_main() == 2 and "no-such-config.yaml" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_broken_pipe_not_of_the_output_is_no_reader_gone():
    """Only a standard output whose reader went (`| head`) ends a command quietly: a pipe of the command's own that
    broke was silenced as one, without a word."""
    from argparse import Namespace

    from geochange.engine.cli import run_command

    def breaks(args):
        raise BrokenPipeError("a socket of the command's own")

    with pytest.raises(BrokenPipeError, match="a socket of the command's own"):
        run_command(Namespace(run=breaks))


def test_cli_stopped_by_sigterm_cancels_and_leaves_nothing(tmp_path, shared_data, random_package):
    tile, out = shared_data / "levir_tile_georef", tmp_path / "out"
    run = subprocess.Popen([*GEOCHANGE, "detect", str(tile / "pre.tif"), str(tile / "post.tif"), "--model",
                            str(random_package), "--out", str(out), "--tile", "128", "--overlap", "16",
                            "--batch", "1", "--threads", "1",
                            # Slow enough (seconds) that the signal comes mid-run: OpenVINO's run of this
                            # tile, its export cached, could end before it.
                            "--backend", "eager", "--tta"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 120
    while not (out.exists() and any(out.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)  # until the outputs are being written under temporary names
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 2 and "geochange: error: cancelled" in stderr
    assert not out.exists()  # the folder the run made went with it


def test_a_cancel_during_the_openvino_export_stops_the_run(tmp_path, levir_crop, random_package):
    """SIGTERM while the model is exported (seconds, on a first run): PyTorch's tracer turns the Cancelled into
    an error of its own, which was taken for a model OpenVINO cannot run; the run went on eagerly to the end."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    run = subprocess.Popen([*GEOCHANGE, "detect", str(levir_crop["pre"]), str(levir_crop["post"]), "--model",
                            str(random_package), "--out", str(out), "--pre-bands", "1,2,3", "--post-bands", "1,2,3",
                            "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "GEOCHANGE_CACHE_DIR": str(cache)})
    lines = []
    for line in run.stdout:  # the export (about 3 s here) starts right after this line
        lines.append(line)
        if line.startswith("backend openvino"):
            time.sleep(0.5)
            run.send_signal(signal.SIGTERM)
            break
    lines += run.stdout.readlines()
    text = "".join(lines)
    assert run.wait(120) == 2 and "geochange: error: cancelled" in text and "runs eagerly" not in text, text
    assert not out.exists() and [p for p in cache.rglob("*") if p.is_file()] == []


def test_cli_reports_errors_plainly(tmp_path, shared_data):
    run = subprocess.run([*GEOCHANGE, "info", str(shared_data / "weights" / "tinycd_levir_official.pth")],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert "pickle checkpoint" in run.stderr and "Traceback" not in run.stderr


def test_cli_evaluate_writes_table_and_json(tinycd_package, shared_data, tmp_path):
    run = subprocess.run([*GEOCHANGE, "evaluate", "--model", str(tinycd_package), "--data",
                          str(shared_data / "levir_cd"), "--device", "cpu", "--json", str(tmp_path / "m.json")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "per_image" in run.stdout and "global" in run.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["global"]["f1"] == pytest.approx(0.9277, abs=0.002)
    assert set(metrics["per_image"]) == set(metrics["global"])


def test_unknown_device_is_a_clear_error(tmp_path, random_package):
    with pytest.raises(GeoChangeError, match="device"):
        detect(tmp_path / "a.tif", tmp_path / "b.tif", random_package, **outputs(tmp_path), device="tpu")


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # the test's own reads
def test_pixel_grid_mode_for_two_plain_images(shared_data, tinycd_package, levir_crop, tmp_path, capsys):
    """Dataset tiles (PNG, no CRS) are paired pixel for pixel: outputs without a CRS, areas in pixels;
    one georeferenced and one plain raster, or plain ones of two sizes, are refused."""
    import numpy as np
    import rasterio
    from osgeo import ogr

    from geochange.engine.assess import assess
    from geochange.engine.cli import main as geochange
    from geochange.engine.grid import PIXEL_TRANSFORM

    name = sorted((shared_data / "levir_cd" / "A").iterdir())[0].name
    pre, post = shared_data / "levir_cd" / "A" / name, shared_data / "levir_cd" / "B" / name
    assert geochange(["detect", str(pre), str(post), "--model", str(tinycd_package), "--out", str(tmp_path / "px"),
                      "--device", "cpu"]) == 0
    said = capsys.readouterr()
    assert "px (no CRS: a pixel grid) changed" in said.out and "256x256 px without a CRS: 1 windows" in said.out
    with rasterio.open(tmp_path / "px" / "change_mask.tif") as src:
        assert src.crs is None and src.shape == (256, 256)
        changed = int((src.read(1) == 255).sum())
    source = ogr.Open(str(tmp_path / "px" / "change_polygons.gpkg"))  # kept: its layer dies with it
    areas = [feature.GetField("area_px") for feature in source.GetLayer(0)]
    assert changed > 0 and sum(areas) == pytest.approx(changed)  # every changed pixel in one polygon, area 1
    # The same pixels as the georeferenced path: the model sees the same windows.
    with rasterio.open(pre) as a, rasterio.open(tmp_path / "px" / "change_probability.tif") as p:
        assert p.shape == (a.height, a.width) and np.isfinite(p.read(1)).all()
    assert geochange(["detect", str(levir_crop["pre"]), str(post), "--model", str(tinycd_package),
                      "--out", str(tmp_path / "mixed"), "--device", "cpu"]) == 2
    assert f"{name}: the raster has no CRS while pre.tif has one" in capsys.readouterr().err
    other = sorted((shared_data / "flood_optical_sar").glob("*/A.png"))[0]
    assert geochange(["detect", str(pre), str(other), "--model", str(tinycd_package), "--out", str(tmp_path / "sizes"),
                      "--device", "cpu"]) == 2
    assert "their sizes differ" in capsys.readouterr().err
    assert not (tmp_path / "mixed").exists() and not (tmp_path / "sizes").exists()
    placed = []
    for i, origin in enumerate((10, 100)):  # no CRS, but geotransforms placing them apart
        placed.append(tmp_path / f"placed{i}.tif")
        with rasterio.open(placed[-1], "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8",
                           transform=rasterio.transform.from_origin(origin, 0, 1, 1)) as dst:
            dst.write(np.zeros((3, 64, 64), np.uint8))
    assert geochange(["detect", *map(str, placed), "--model", str(tinycd_package), "--out", str(tmp_path / "apart"),
                      "--device", "cpu"]) == 2
    assert "their geotransforms differ" in capsys.readouterr().err

    # The mask assessed against the tile's label (a PNG without a geotransform): pixel for pixel.
    figures = assess(str(tmp_path / "px" / "change_mask.tif"), str(shared_data / "levir_cd" / "label" / name))
    assert figures["pixels_assessed"] == 256 * 256
    # The same tiles placed by one geotransform but without a CRS: the outputs keep it, so that they overlay the
    # inputs in QGIS, with the same pixels; areas stay in pixels.
    together = rasterio.transform.from_origin(500000, 4000000, 0.5, 0.5)
    for date, path, transform in (("pre", pre, together), ("post", post, together), ("pixels", post, PIXEL_TRANSFORM)):
        with rasterio.open(path) as src, rasterio.open(tmp_path / f"{date}.tif", "w", driver="GTiff", width=256,
                                                        height=256, count=3, dtype="uint8", transform=transform) as dst:
            dst.write(src.read())
    # A PNG without a geotransform beside a GeoTIFF placed as QGIS draws it: one grid.
    assert geochange(["detect", str(pre), str(tmp_path / "pixels.tif"), "--model", str(tinycd_package),
                      "--out", str(tmp_path / "drawn"), "--device", "cpu"]) == 0
    assert geochange(["detect", str(tmp_path / "pre.tif"), str(tmp_path / "post.tif"), "--model", str(tinycd_package),
                      "--out", str(tmp_path / "placed"), "--device", "cpu"]) == 0
    with rasterio.open(tmp_path / "placed" / "change_mask.tif") as src:
        assert src.crs is None and src.transform == together and int((src.read(1) == 255).sum()) == changed
    source = ogr.Open(str(tmp_path / "placed" / "change_polygons.gpkg"))
    layer = source.GetLayer(0)
    assert sum(feature.GetField("area_px") for feature in layer) == pytest.approx(changed)
    left, right, bottom, top = layer.GetExtent()
    assert 500000 <= left < right <= 500128 and 3999872 <= bottom < top <= 4000000


def test_the_default_tile_is_the_one_the_package_records(tinycd_package, shared_data, tmp_path):
    """The TinyCD authors' files record the 256 px crops they were trained on (import-weights); detect uses
    it unless told otherwise, and 512 for a package that records none, saying which."""
    import rasterio as rio

    from geochange.engine.package import load_package, read_tensors, write_package

    class Log(Progress):
        def __init__(self):
            super().__init__()
            self.lines = []

        def log(self, message):
            self.lines.append(message)

    assert load_package(tinycd_package).tile == 256
    manifest = load_package(tinycd_package).manifest
    del manifest["tile"]
    untiled = write_package(read_tensors(tinycd_package), manifest, tmp_path / "untiled.safetensors")
    probabilities, levir = {}, shared_data / "levir_tile_georef"  # 1024 px: several windows either way
    for name, model, tile in (("recorded", tinycd_package, None), ("given", tinycd_package, 256),
                              ("none recorded", untiled, None), ("512", tinycd_package, 512)):
        log = Log()
        result = detect(levir / "pre.tif", levir / "post.tif", model, **outputs(tmp_path / name.replace(" ", "_")),
                        tile=tile, device="cpu", progress=log)
        with rio.open(result.probability) as src:
            probabilities[name] = src.read(1)
        if tile is None:
            expected = "windows of 256 px: the model's tile" if name == "recorded" else \
                "windows of 512 px: the model's tile (none recorded: the default)"
            assert expected in log.lines
    assert np.array_equal(probabilities["recorded"], probabilities["given"])
    assert np.array_equal(probabilities["none recorded"], probabilities["512"])
    assert not np.array_equal(probabilities["recorded"], probabilities["512"])


class Fractions(Progress):
    def __init__(self):
        self.values = []

    def update(self, done, total):
        self.values.append(done / total)


def test_a_cpu_run_reads_in_the_models_thread_and_writes_in_a_writer_thread(shared_data, tmp_path, random_package,
                                                                             monkeypatch):
    seen = {"read": set(), "written": set()}

    def watched(method, step):
        def run(*args, **kwargs):
            seen[step].add(threading.current_thread().name)
            return method(*args, **kwargs)
        return run

    monkeypatch.setattr(PairReader, "__call__", watched(PairReader.__call__, "read"))
    monkeypatch.setattr(ChangeWriter, "write_rows", watched(ChangeWriter.write_rows, "written"))
    tile = shared_data / "levir_tile_georef"
    result = detect(tile / "pre.tif", tile / "post.tif", random_package, **outputs(tmp_path), tile=128, overlap=16,
                    device="cpu")
    assert seen["read"] == {threading.main_thread().name}
    assert len(seen["written"]) == 1 and seen["written"].pop().startswith("geochange-write")
    assert result.polygons.exists()


@pytest.mark.parametrize("readers", [0, 2])
def test_progress_moves_window_by_window_and_ends_at_one(shared_data, random_package, tmp_path, readers):
    """The 1024² tile in 9 windows of 512 px, run in 3 batches of 3: an update as each window is read (in
    this thread, or as its batch comes from a reader thread) and as it is run, then as rows are written and
    the outputs finished; never back, from 0 to exactly 1."""
    tile, progress = shared_data / "levir_tile_georef", Fractions()
    detect(tile / "pre.tif", tile / "post.tif", random_package, **outputs(tmp_path), tile=512, overlap=64,
           readers=readers, progress=progress)
    values = progress.values
    assert values[0] == 0 and values[-1] == 1 and all(a <= b for a, b in zip(values, values[1:]))
    assert len(set(values)) >= 2 * 9 + 2, values


def test_a_single_window_shows_the_phases_of_its_run(levir_crop, random_package, tmp_path):
    """One window: read, run, its rows written, the polygons and the two COGs finished; measured 2.8, 92.7,
    96.8, 97.9 and 98.9 % before 100."""
    progress = Fractions()
    detect(levir_crop["pre"], levir_crop["post"], random_package, **outputs(tmp_path), tile=256, progress=progress)
    inner = [value for value in progress.values if 0 < value < 1]
    assert len(inner) >= 4 and inner[0] < 0.1 and progress.values[-1] == 1, progress.values


@pytest.fixture(scope="module")
def levir_2m(shared_data, tmp_path_factory) -> dict:
    """The LEVIR tile's dates at 4 times coarser pixels (about 2.2 m), each the mean of the 4 x 4 it covers."""
    from rasterio.enums import Resampling

    folder, paths = tmp_path_factory.mktemp("levir_2m"), {}
    for name in ("pre", "post"):
        with rasterio.open(shared_data / "levir_tile_georef" / f"{name}.tif") as src:
            shape = (src.count, src.height // 4, src.width // 4)
            profile = {"driver": "GTiff", "count": src.count, "dtype": src.dtypes[0], "crs": src.crs,
                       "width": shape[2], "height": shape[1], "transform": src.transform * src.transform.scale(4, 4)}
            paths[name] = folder / f"{name}_2m.tif"
            with rasterio.open(paths[name], "w", **profile) as dst:
                dst.write(src.read(out_shape=shape, resampling=Resampling.average))
    return paths


def test_resolution_model_finds_at_coarse_pixels_what_the_model_finds_at_its_own(levir_run, levir_2m, tinycd_package,
                                                                                tmp_path):
    """At 2.2 m (4.4 times the model's 0.5 m) the LEVIR model finds nothing, and says why; read at its pixel
    size it finds most buildings of the native run, none elsewhere, on the 2.2 m grid."""
    import shapely

    native_out = levir_run[0]
    pair = [str(levir_2m["pre"]), str(levir_2m["post"])]
    common = ["--model", str(tinycd_package), "--tile", "512", "--overlap", "64", "--batch", "2", "--device", "cpu"]
    plain = subprocess.run([*GEOCHANGE, "detect", *pair, *common, "--out", str(tmp_path / "plain")],
                           capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr
    assert "0 change polygons" in plain.stdout and "(4.4 times coarser)" in plain.stdout
    assert "--resolution model reads both dates at the model's pixel size" in plain.stdout
    run = subprocess.run([*GEOCHANGE, "detect", *pair, *common, "--resolution", "model", "--out", str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "both dates read at the model's 0.5 m pixels" in run.stdout and "1057x1223 px in EPSG:4326" in run.stdout
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["change_mask.tif", "change_polygons.gpkg",
                                                                  "change_probability.tif"]
    with rasterio.open(tmp_path / "m" / "change_mask.tif") as m, rasterio.open(levir_2m["pre"]) as pre:
        assert (m.crs, m.transform, m.shape) == (pre.crs, pre.transform, pre.shape)
        assert set(np.unique(m.read(1))) == {0, 255}

    def polygons(folder):
        source = ogr.Open(str(folder / "change_polygons.gpkg"))
        return [shapely.from_wkb(bytes(f.GetGeometryRef().ExportToWkb())) for f in source.GetLayer(0)]

    native, coarse = polygons(native_out), polygons(tmp_path / "m")
    found = shapely.STRtree(coarse).query(native, predicate="intersects")[0]
    true = shapely.STRtree(native).query(coarse, predicate="intersects")[0]
    # Measured: 87 of the 129 native polygons found by 87 polygons, each of which touches a native one (95 of 130 while
    # the model's pixels were square in degrees, as the tile's approximate georeference has them: 0.87 as wide on the
    # ground as high at its 30° N; now they are square on the ground).
    assert len(set(found)) >= 0.65 * len(native) and len(set(true)) >= 0.95 * len(coarse)


def test_a_cancel_during_the_cog_copies_stops_them_and_leaves_nothing(tmp_path):
    from rasterio.crs import CRS

    from geochange.engine.grid import Grid
    from geochange.engine.outputs import ChangeWriter

    grid = Grid(CRS.from_epsg(32614), from_origin(630000, 3340000, 0.5, 0.5), 2048, 2048)
    out = tmp_path / "out"
    writer = ChangeWriter(grid, **outputs(out), threshold=0.5)
    probability = np.zeros((2048, 2048), np.float32)
    probability[100:300, 100:300] = 0.9
    writer.write_rows(0, probability, np.ones(probability.shape, bool))

    class CancelInTheFirstCopy(Progress):
        def __init__(self):
            self.copying, self.seen = False, []

        def update(self, done, total):  # steps: the polygons, then each raster's copy
            self.seen.append((done, total))
            self.copying = done > 1

        def cancelled(self):
            return self.copying

    progress = CancelInTheFirstCopy()
    with pytest.raises(Cancelled):
        writer.close(progress)
    assert any(1 < done < 2 for done, _ in progress.seen), progress.seen  # GDAL reported the copy as it went
    assert not out.exists() or list(out.iterdir()) == []
