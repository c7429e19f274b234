"""Output rasters: overviews built band by band are those GDAL builds from the whole raster; the
outputs take their final names together or not at all."""
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from osgeo import gdal
from rasterio.transform import from_origin

from geochange.engine.atomic import atomic_path
from geochange.engine.errors import Cancelled
from geochange.engine.grid import Grid
from geochange.engine.outputs import ChangeWriter, StagedRaster, overview_factors
from geochange.engine.progress import cancel_on_sigterm

# Overviews halve exactly on the first grid, as GDAL's do; on the second, odd sides leave a last row
# and column that stand alone (GDAL spreads them over the overview's slightly wider pixels instead).
EVEN = Grid(rasterio.crs.CRS.from_epsg(32614), from_origin(500000, 4000000, 0.5, 0.5), 4096, 704)
ODD = Grid(EVEN.crs, EVEN.transform, 2101, 701)


def _write_staged(path, grid, values, valid, **options):
    staged = StagedRaster(path, grid, values.dtype.name, options.pop("nodata"), **options)
    # Bands of odd heights and one of two rows, as a detection's first and last bands can be.
    bands = [0, 448, 485, 512, grid.height - 2, grid.height]
    for a, b in zip(bands[:-1], bands[1:]):
        staged.write(a, values[a:b], valid[a:b])
    staged.close()


def _gdal_overviews(path, grid, values, resampling):
    with rasterio.open(path, "w", driver="GTiff", width=grid.width, height=grid.height, count=1,
                       dtype=values.dtype, crs=grid.crs, transform=grid.transform) as dst:
        dst.write(values, 1)
        dst.build_overviews(overview_factors(grid.width, grid.height), resampling)
    return _overviews(path)


def _blocks(a, f):
    """``a`` summed over blocks of ``f`` x ``f`` (zero-padded at the bottom and right)."""
    a = np.pad(a, ((0, -a.shape[0] % f), (0, -a.shape[1] % f)))
    return a.reshape(a.shape[0] // f, f, a.shape[1] // f, f).sum((1, 3))


def _overviews(path):
    ds = gdal.Open(str(path))
    band = ds.GetRasterBand(1)
    return [band.GetOverview(i).ReadAsArray() for i in range(band.GetOverviewCount())]


@pytest.mark.parametrize("width,height", [(512, 512), (513, 20), (2101, 701), (700, 4096), (16384, 300)])
def test_overview_factors_are_those_of_the_cog_driver(tmp_path, width, height):
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 1, "dtype": "uint8",
               "crs": "EPSG:32614", "transform": from_origin(500000, 4000000, 1, 1)}
    with rasterio.open(tmp_path / "plain.tif", "w", **profile):
        pass
    rasterio.shutil.copy(tmp_path / "plain.tif", tmp_path / "cog.tif", driver="COG", BLOCKSIZE=512)
    with rasterio.open(tmp_path / "cog.tif") as cog:
        assert overview_factors(width, height) == cog.overviews(1)


def test_average_overviews_are_gdals_and_means_of_the_valid_pixels(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.random((EVEN.height, EVEN.width), dtype=np.float32)
    _write_staged(tmp_path / "even.tif", EVEN, values, np.ones_like(values, bool), nodata=-1.0, average=True,
                  compress="NONE")
    ours = _overviews(tmp_path / "even.tif")
    assert [o.shape for o in ours] == [(352, 2048), (176, 1024), (88, 512)]
    for level, theirs in zip(ours, _gdal_overviews(tmp_path / "gdal.tif", EVEN, values,
                                                   rasterio.enums.Resampling.average), strict=True):
        np.testing.assert_allclose(level, theirs, atol=1e-6)

    # With nodata and odd sides: each overview pixel is the mean of the valid pixels under it.
    values = values[:ODD.height, :ODD.width]
    valid = rng.random(values.shape) > 0.3
    valid[:64, :64] = False  # a block of nodata at every level
    _write_staged(tmp_path / "odd.tif", ODD, np.where(valid, values, -1), valid, nodata=-1.0, average=True,
                  compress="NONE")
    ours = _overviews(tmp_path / "odd.tif")
    assert [o.shape for o in ours] == [(351, 1051), (176, 526), (88, 263)]
    for level, f in zip(ours, overview_factors(ODD.width, ODD.height), strict=True):
        count = _blocks(valid.astype(float), f)
        with np.errstate(invalid="ignore"):
            expected = np.where(count > 0, _blocks(np.where(valid, values, 0.0), f) / count, -1)
        assert level[0, 0] == -1
        np.testing.assert_allclose(level, expected, atol=1e-5)
    with rasterio.open(tmp_path / "odd.tif") as staged:
        np.testing.assert_array_equal(staged.read(1), np.where(valid, values, -1))
        assert staged.nodata == -1 and staged.crs == ODD.crs and staged.transform == ODD.transform


def test_nearest_overviews_are_gdals_top_left_pixels(tmp_path):
    values = np.random.default_rng(1).choice(np.array([0, 127, 255], np.uint8), (EVEN.height, EVEN.width))
    _write_staged(tmp_path / "even.tif", EVEN, values, values != 127, nodata=127, average=False, compress="ZSTD")
    for level, theirs in zip(_overviews(tmp_path / "even.tif"), _gdal_overviews(
            tmp_path / "gdal.tif", EVEN, values, rasterio.enums.Resampling.nearest), strict=True):
        np.testing.assert_array_equal(level, theirs)
    values = values[:ODD.height, :ODD.width]
    _write_staged(tmp_path / "odd.tif", ODD, values, values != 127, nodata=127, average=False, compress="ZSTD")
    for level, f in zip(_overviews(tmp_path / "odd.tif"), overview_factors(ODD.width, ODD.height), strict=True):
        np.testing.assert_array_equal(level, values[::f, ::f])


def test_rows_out_of_order_are_refused(tmp_path):
    staged = StagedRaster(tmp_path / "s.tif", ODD, "uint8", 127, average=False, compress="NONE")
    rows = np.zeros((10, ODD.width), np.uint8)
    staged.write(0, rows, rows == 0)
    with pytest.raises(ValueError, match="rows from 20 given where rows from 10 come next"):
        staged.write(20, rows, rows == 0)
    staged.close()


def test_a_caller_may_reuse_its_row_buffer(tmp_path):
    values = np.random.default_rng(2).integers(0, 255, (ODD.height, ODD.width), dtype=np.uint8)
    staged = StagedRaster(tmp_path / "s.tif", ODD, "uint8", 127, average=False, compress="NONE")
    buffer = np.empty((99, ODD.width), np.uint8)  # odd bands: each leaves a row waiting for its pair
    for start in range(0, ODD.height, 99):
        rows = values[start:start + 99]
        buffer[:len(rows)] = rows
        staged.write(start, buffer[:len(rows)], buffer[:len(rows)] != 127)
        buffer[:] = 0
    staged.close()
    for level, f in zip(_overviews(tmp_path / "s.tif"), overview_factors(ODD.width, ODD.height), strict=True):
        np.testing.assert_array_equal(level, values[::f, ::f])


def test_closing_before_the_last_row_is_refused_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    writer = ChangeWriter(ODD, probability=out / "p.tif", mask=out / "m.tif", polygons=out / "c.gpkg",
                          threshold=0.5)
    prob = np.random.default_rng(0).random((300, ODD.width), dtype=np.float32)
    writer.write_rows(0, prob, np.ones(prob.shape, bool))
    with pytest.raises(ValueError, match="only 300 of 701 rows were written"):
        writer.close()
    assert not out.exists() or not any(out.iterdir())


def _write_all_rows(out, polygons="c.shp") -> ChangeWriter:
    writer = ChangeWriter(ODD, probability=out / "p.tif", mask=out / "m.tif", polygons=out / polygons, threshold=0.5)
    prob = np.random.default_rng(0).random((ODD.height, ODD.width), dtype=np.float32)
    writer.write_rows(0, prob, np.ones(prob.shape, bool))
    return writer


# An earlier run's outputs, with a side file a new run does not write (GDAL's statistics)
# and a user's style for the polygons.
STALE, USERS = ("p.tif.aux.xml",), ("c.qml",)


def _old_outputs(out) -> dict:
    out.mkdir()
    names = ("p.tif", "m.tif", "c.shp", "c.dbf", "c.shx", "c.cpg", *STALE, *USERS)
    old = {name: f"old {name}".encode() for name in names}
    for name, content in old.items():
        (out / name).write_bytes(content)
    return old


def _replace_failing_at(monkeypatch, target_name, action):
    """os.replace as the outputs' renames see it, doing ``action`` when a temporary is renamed to
    ``target_name`` (a fault injected between the renames)."""
    real = os.replace

    def replace(source, target):
        if Path(target).name == target_name and ".partial" in Path(source).name:
            action()
        return real(source, target)

    monkeypatch.setattr("geochange.engine.atomic.os.replace", replace)


def test_a_failed_rename_puts_every_output_back_as_it_was(tmp_path, monkeypatch):
    out = tmp_path / "out"
    old = _old_outputs(out)
    writer = _write_all_rows(out)

    def fail():
        raise OSError("disk gone")

    _replace_failing_at(monkeypatch, "m.tif", fail)
    with pytest.raises(OSError, match="disk gone"):
        writer.close()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old  # none replaced, nothing left over


def test_a_signal_during_the_renames_cancels_the_whole_run(tmp_path, monkeypatch):
    out = tmp_path / "out"
    old = _old_outputs(out)
    writer = _write_all_rows(out)
    _replace_failing_at(monkeypatch, "c.dbf", lambda: signal.raise_signal(signal.SIGTERM))
    restore = cancel_on_sigterm()
    try:
        with pytest.raises(Cancelled):
            writer.close()
    finally:
        restore()
    # The renames already done were undone, the earlier side files (moved aside after every rename) put back.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old


def test_outputs_replace_earlier_ones_together(tmp_path):
    out = tmp_path / "out"
    old = _old_outputs(out)
    writer = _write_all_rows(out)
    writer.close()
    # The earlier side files gone with their outputs (an .aux.xml's statistics were the old raster's); the style kept.
    assert sorted(p.name for p in out.iterdir()) == ["c.cpg", "c.dbf", "c.prj", "c.qml", "c.shp", "c.shx", "m.tif",
                                                     "p.tif"]
    assert all((out / name).read_bytes() != content for name, content in old.items() if name not in STALE + USERS)
    assert (out / "c.qml").read_bytes() == old["c.qml"]
    with rasterio.open(out / "p.tif") as src:
        assert src.shape == (ODD.height, ODD.width)


def test_an_output_without_a_suffix_is_kept(tmp_path):
    with atomic_path(tmp_path / "results") as tmp:
        tmp.write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["results"]
