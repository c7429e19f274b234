"""``--resolution model``: both dates read at the model's pixel size, the outputs on the grid raster's grid.
(The recovery of the LEVIR tile's buildings from 2.2 m pixels is in test_detect.py, beside its native run.)"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.transform import from_origin

from geochange.engine.contracts import MASK_NODATA, PROBABILITY_NODATA
from geochange.engine.detect import detect, prepare
from geochange.engine.errors import Cancelled, OptionError
from geochange.engine.grid import Grid
from geochange.engine.manifest import make_manifest
from geochange.engine.models import create
from geochange.engine.options import DetectOptions
from geochange.engine.package import save_package
from geochange.engine.progress import Progress
from geochange.engine.resample import model_grid

GEOCHANGE = [sys.executable, "-m", "geochange.engine"]


@pytest.fixture(scope="module")
def half_metre_package(tmp_path_factory):
    """TinyCD with random weights whose package records 0.5 m pixels."""
    return save_package(create("tinycd").eval(), make_manifest("tinycd", gsd=0.5),
                        tmp_path_factory.mktemp("pkg") / "gsd.safetensors")


def write_pair(folder, size: int, pixel: float, crs="EPSG:32614"):
    """Two random 3-band rasters of ``size`` px of ``pixel`` CRS units, on one grid."""
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a", "b"):
        paths.append(folder / f"{name}.tif")
        with rasterio.open(paths[-1], "w", driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs=crs,
                           transform=from_origin(630000, 3340000, pixel, pixel)) as dst:
            dst.write(rng.integers(1, 255, (3, size, size), np.uint8))
    return paths


def outputs(folder):
    return {"probability": folder / "p.tif", "mask": folder / "m.tif", "polygons": folder / "c.gpkg"}


def test_the_model_s_grid_covers_the_output_grid_from_its_corner_or_centred_on_it():
    utm = Grid(CRS.from_epsg(32614), from_origin(630000, 3340000, 2.0, 2.0), 101, 50)
    fine = model_grid(utm, 0.5)
    assert fine.transform == Affine(0.5, 0, 630000, 0, -0.5, 3340000) and (fine.width, fine.height) == (404, 200)
    assert model_grid(utm, 2.0) is utm  # its pixels are the model's already
    coarse = model_grid(utm, 3.0)  # 202 m by 100 m in pixels of 3 m: covered whole, 2 m over, 1 m each side
    assert (coarse.width, coarse.height) == (68, 34)
    assert coarse.transform == Affine(3.0, 0, 629999, 0, -3.0, 3340001)
    # At 7 m: 1 m over across (the last pixel's centre on the grid: from the corner, where a date at 7 m lying there
    # is read as it is), 5 m over down (centred).
    assert model_grid(utm, 7.0).transform == Affine(7.0, 0, 630000, 0, -7.0, 3340002.5)
    # In degrees: pixels square on the ground at the middle latitude, whose size (as the scale warning measures it)
    # is the model's: at 60°, half as many degrees wide as high.
    nordic = Grid(CRS.from_epsg(4326), from_origin(10.0, 60.003, 2e-5, 2e-5), 300, 300)
    degrees = model_grid(nordic, 0.5)
    assert -degrees.transform.e == pytest.approx(0.5 / 111_320) and degrees.pixel_metres() == pytest.approx(0.5)
    assert degrees.transform.a == pytest.approx(2 * -degrees.transform.e, rel=1e-3)
    # Web Mercator at 60°: a unit is half a metre on the ground there (its scale is 2), so 1-unit pixels are the
    # model's 0.5 m already (taken for 1 m, they became a grid of 4 times the pixels, each 0.25 m on the ground).
    mercator = Grid(CRS.from_epsg(3857), from_origin(1113195.0, 8399737.9, 1.0, 1.0), 128, 128)
    assert mercator.pixel_metres() == pytest.approx(0.5, rel=1e-3)
    assert model_grid(mercator, 0.5).transform.a == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(OptionError, match=r"^--resolution model: this model records no ground sampling distance "
                                          r"\(gsd, .*\); give --resolution in the CRS's units instead$"):
        model_grid(utm, None)
    with pytest.raises(OptionError, match="--resolution model: at the model's 1e-06 m pixels the grid would be "
                                          r"20\d+ x 10\d+ px, too large; cut the area with --aoi"):
        model_grid(utm, 1e-6)


def test_the_option_takes_a_number_or_model_and_names_both():
    assert DetectOptions(resolution="model").resolution == "model"
    with pytest.raises(OptionError, match=r"^--resolution must be a number above 0 or model, not 'fine'$"):
        DetectOptions(resolution="fine")


def test_a_package_without_a_pixel_size_is_refused_in_one_line(shared_data, random_package, tmp_path):
    tile = shared_data / "levir_tile_georef"
    run = subprocess.run([*GEOCHANGE, "detect", str(tile / "pre.tif"), str(tile / "post.tif"), "--model",
                          str(random_package), "--out", str(tmp_path / "out"), "--resolution", "model"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("geochange: error: --resolution model: this model records no ground sampling "
                                 "distance")
    assert not (tmp_path / "out").exists()


def test_pixels_of_the_model_s_size_run_as_they_are(tmp_path, half_metre_package):
    a, b = write_pair(tmp_path, 96, 0.5)
    setup = prepare(a, b, half_metre_package, DetectOptions(resolution="model"))
    assert setup.model_grid is None and setup.plan.width == 96  # nothing to resample
    at_model = detect(a, b, half_metre_package, **outputs(tmp_path / "model"), resolution="model", tile=64, overlap=16)
    plain = detect(a, b, half_metre_package, **outputs(tmp_path / "plain"), tile=64, overlap=16)
    with rasterio.open(at_model.probability) as m, rasterio.open(plain.probability) as p:
        assert np.array_equal(m.read(1), p.read(1))


def test_coarse_pixels_are_read_finer_and_the_outputs_keep_them(tmp_path, half_metre_package):
    """1.3 m pixels with a 0.5 m model: the model reads a 2.6 times larger grid, its probability comes back on
    the 1.3 m grid, valid to the last row and column; the scratch raster is gone and nothing else is left."""
    a, b = write_pair(tmp_path, 75, 1.3)
    log = []

    class Log(Progress):
        def log(self, message):
            log.append(message)

    setup = prepare(a, b, half_metre_package, DetectOptions(resolution="model", tile=64, overlap=16))
    assert (setup.model_grid.width, setup.model_grid.height) == (195, 195) and setup.plan.width == 195
    result = detect(a, b, half_metre_package, **outputs(tmp_path / "out"), resolution="model", tile=64, overlap=16,
                    progress=Log())
    assert "both dates read at the model's 0.5 m pixels (0.5 CRS units a side), its probability resampled onto " \
           "the 75x75 px output grid" in log
    with rasterio.open(result.probability) as p, rasterio.open(a) as src:
        assert (p.width, p.height, p.transform, p.crs) == (src.width, src.height, src.transform, src.crs)
        probability = p.read(1)
    assert (probability != PROBABILITY_NODATA).all() and 0 <= probability.min() and probability.max() <= 1
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["c.gpkg", "m.tif", "p.tif"]


def nodata_columns(path, columns: slice) -> None:
    """Make ``columns`` of the raster at ``path`` nodata (0, declared)."""
    with rasterio.open(path, "r+") as dst:
        data = dst.read()
        data[:, :, columns] = 0
        dst.write(data)
        dst.nodata = 0


def test_the_output_s_right_and_bottom_edges_come_back_from_coarser_model_pixels(tmp_path):
    """1 m pixels, a 6 m model, 98 px a side: the model's grid, laid from the top-left corner, ended in a pixel of
    96-102 m, whose centre lies off the data: GDAL's warper left it nodata, and with it the output's last 2 columns
    and rows (388 px). Centred, each edge's model pixel is 2 m over and read from its part on the data."""
    package = save_package(create("tinycd").eval(), make_manifest("tinycd", gsd=6.0), tmp_path / "gsd6.safetensors")
    a, b = write_pair(tmp_path, 98, 1.0)
    result = detect(a, b, package, **outputs(tmp_path / "whole"), resolution="model", tile=64, overlap=16)
    with rasterio.open(result.probability) as p:
        probability = p.read(1)
    assert probability.shape == (98, 98) and (probability != PROBABILITY_NODATA).all()
    setup = prepare(a, b, package, DetectOptions(resolution="model", tile=64, overlap=16))
    assert setup.model_grid.transform == Affine(6.0, 0, 629998, 0, -6.0, 3340002) and setup.model_grid.width == 17
    # Where the post date has no data (its right 10 columns), the outputs have none either; the bottom rows keep
    # theirs up to a model pixel from that edge (one across it is valid where its centre is on data, as GDAL reads).
    nodata_columns(b, slice(88, None))
    result = detect(a, b, package, **outputs(tmp_path / "cut"), resolution="model", tile=64, overlap=16,
                    threshold=0.0)
    with rasterio.open(result.mask) as m:
        mask = m.read(1)
    assert (mask[:, 88:] == MASK_NODATA).all() and (mask[-2:, :82] != MASK_NODATA).all()


def test_nodata_and_the_area_of_interest_stay_at_the_output_s_pixels(tmp_path, half_metre_package):
    a, b = write_pair(tmp_path, 64, 2.0)
    nodata_columns(b, slice(0, 10))  # the post date's left 10 columns
    result = detect(a, b, half_metre_package, **outputs(tmp_path / "out"), resolution="model", tile=64, overlap=16,
                    threshold=0.0)
    with rasterio.open(result.mask) as m:
        mask = m.read(1)
    assert (mask[:, :10] == MASK_NODATA).all() and (mask[:, 10:] != MASK_NODATA).all()


def test_an_area_of_interest_s_pixels_all_come_back_from_coarser_model_pixels(tmp_path):
    """The model's grid was read with the area of interest, so its pixels just outside the area were nodata: the
    output pixels inside it, near its edge, had no model pixels to resample and came back nodata (91 of 7,530)."""
    from rasterio.features import geometry_mask
    from shapely.geometry import Polygon, mapping

    from conftest import write_polygons

    package = save_package(create("tinycd").eval(), make_manifest("tinycd", gsd=3.0), tmp_path / "gsd3.safetensors")
    a, b = write_pair(tmp_path, 96, 1.0)
    triangle = Polygon([(630010.3, 3339990.2), (630085.7, 3339970.1), (630050.2, 3339910.9)])
    aoi = write_polygons(tmp_path / "aoi.gpkg", [mapping(triangle)], 32614)
    result = detect(a, b, package, **outputs(tmp_path / "out"), resolution="model", tile=64, overlap=16,
                    threshold=0.0, aoi=str(aoi))
    with rasterio.open(result.mask) as m:
        mask = m.read(1)
    inside = geometry_mask([triangle], mask.shape, result.grid.transform, invert=True)
    assert inside.sum() > 2000 and (mask[inside] != MASK_NODATA).all() and (mask[~inside] == MASK_NODATA).all()


@pytest.mark.parametrize("when", ["windows", "rows"])
def test_a_cancel_while_the_model_s_rows_are_staged_leaves_nothing(tmp_path, half_metre_package, when):
    """Cancelled while the windows run into the scratch raster, or once it is read back onto the output grid."""
    a, b = write_pair(tmp_path, 64, 2.0)
    out = tmp_path / "out"

    class CancelWithTheScratch(Progress):
        percent, stopped = 0.0, False

        def update(self, done, total):
            self.percent = 100 * done / total

        def cancelled(self):  # the windows are 99.5 % of this run
            there = any(out.glob(".*.scratch.tif"))
            self.stopped |= there and (when == "windows" or self.percent > 99)
            return self.stopped

    progress = CancelWithTheScratch()
    with pytest.raises(Cancelled):
        detect(a, b, half_metre_package, **outputs(out), resolution="model", tile=64, overlap=16, progress=progress)
    assert progress.stopped and (not out.exists() or list(out.iterdir()) == [])
