"""torchrun with two CPU processes (gloo) gives exactly the outputs of one process."""
import itertools
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from osgeo import ogr
from rasterio.windows import Window

from conftest import free_port
from geochange.engine.distributed import _bands_from_parts, _halo_start, _part_path, rank_tile_rows
from geochange.engine.errors import OutputError


def test_tile_rows_are_split_without_gap_or_overlap():
    for count in (1, 2, 5, 9):
        for world in (1, 2, 3, 4):
            rows = [list(rank_tile_rows(count, world, r)) for r in range(world)]
            assert sum(rows, []) == list(range(count))
    assert _halo_start([0, 96, 192, 288], 128, 2) == 1
    assert _halo_start([0, 40, 80, 120], 128, 3) == 0  # overlap over half a tile: two rows above


def test_a_rank_s_rows_missing_from_the_shared_folder_are_an_error(tmp_path):
    """Rank 0 writes every rank's rows: where one rank's part is not there (nodes that share no output folder),
    the run fails rather than write outputs with a gap."""
    row_starts = [0, 96, 192, 288]  # two tile rows for each of two ranks
    np.save(_part_path(tmp_path, 0), np.zeros((192, 8), np.float32))
    bands = _bands_from_parts(tmp_path, row_starts, 384, 2)
    assert [start for start, _, _ in itertools.islice(bands, 2)] == [0, 96]
    with pytest.raises(OutputError, match="rank 1's rows are not there; every rank must write into the output folder"):
        next(bands)


def crop(src_path, dst_path, window):
    with rasterio.open(src_path) as src:
        profile = dict(src.profile, width=window.width, height=window.height,
                       transform=src.window_transform(window))
        data = src.read(window=window)
    with rasterio.open(dst_path, "w", **profile) as dst:
        dst.write(data)
    return dst_path


def features(path):
    source = ogr.Open(str(path))  # the layer lives only as long as its data source
    layer = source.GetLayer()
    return [(f.GetField("id"), round(f.GetField("area_m2"), 6), f.GetField("mean_prob"), f.GetField("max_prob"),
             f.GetGeometryRef().ExportToWkt()) for f in layer]


def test_two_ranks_equal_one_process(tinycd_package, shared_data, tmp_path, one_and_two_ranks):
    tile = shared_data / "levir_tile_georef"
    window = Window(256, 128, 384, 560)  # 560 rows: 5 tile rows of 128 px at stride 96 (the last shifted)
    pre = crop(tile / "pre.tif", tmp_path / "pre.tif", window)
    post = crop(tile / "post.tif", tmp_path / "post.tif", window)
    args = [str(pre), str(post), "--model", str(tinycd_package), "--tile", "128", "--overlap", "32",
            "--batch", "2", "--device", "cpu", "--threads", "1"]
    one_dir, two_dir = one_and_two_ranks(args)
    for name in ("change_probability.tif", "change_mask.tif"):
        with rasterio.open(one_dir / name) as a, rasterio.open(two_dir / name) as b:
            assert a.profile == b.profile
            np.testing.assert_array_equal(a.read(), b.read())
    one, two = features(one_dir / "change_polygons.gpkg"), features(two_dir / "change_polygons.gpkg")
    assert len(one) > 5 and one == two
    assert sorted(p.name for p in two_dir.iterdir()) == sorted(p.name for p in one_dir.iterdir())


def test_a_rank_s_error_ends_every_rank_and_leaves_nothing(tinycd_package, shared_data, tmp_path):
    """The lower rows of a file cut short fail on rank 1; rank 0 ends too (torchrun's SIGTERM, a cancel,
    or its barrier failing) and removes the part files."""
    data = (shared_data / "levir_tile_georef" / "pre.tif").read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[:len(data) * 6 // 10])
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          str(free_port()), "-m", "geochange.engine", "detect", str(cut),
                          str(shared_data / "levir_tile_georef" / "post.tif"), "--model", str(tinycd_package),
                          "--tile", "256", "--overlap", "32", "--device", "cpu", "--threads", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "geochange: error: " in run.stderr and "cut.tif: cannot read pixels, the file is corrupt" in run.stderr
    assert not out.exists() or list(out.iterdir()) == []  # no part files, no temporaries

