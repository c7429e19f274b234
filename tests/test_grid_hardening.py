"""The common grid of unusual pairs and bounds on options: rotated or sheared rasters are warped onto a
north-up grid as GDAL's warper reads them; absurd sizes, CRSs and thresholds are one-line errors."""
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from osgeo import gdal, osr
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window
from shapely.geometry import MultiPolygon, Polygon, box, mapping

from conftest import FIJI_EAST, FIJI_UTM, FIJI_WEST, write_constant, write_masked_raster, write_polygons
from geochange.engine.aoi import area_of_interest
from geochange.engine.assess import raster_on
from geochange.engine.detect import detect, prepare
from geochange.engine.errors import OptionError, OutputError, RasterError
from geochange.engine.evaluate import evaluate_folder
from geochange.engine.grid import Grid, GridReader, PairReader, common_grid
from geochange.engine.options import DetectOptions
from geochange.engine.package import load_package
from geochange.engine.progress import Progress
from geochange.engine.rasters import read_masks, valid_mask
from geochange.engine.windows import WindowPlan

GEOCHANGE = [sys.executable, "-m", "geochange.engine"]
ORIGIN = Affine.translation(630000, 3340000)
NORTH_UP = ORIGIN * Affine.scale(0.5, -0.5)
ROTATED = ORIGIN * Affine.rotation(10) * Affine.scale(0.5, -0.5)
SHEARED = ORIGIN * Affine.shear(0, 15) * Affine.scale(0.5, -0.5)  # a and e as NORTH_UP's, b non-zero
SOUTH_UP = Affine.translation(630000, 3340000 - 128) * Affine.scale(0.5, 0.5)  # rows run north


def write_raster(path, transform, width=256, height=256, seed=0):
    data = np.random.default_rng(seed).integers(1, 255, (3, height, width), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
                       crs="EPSG:32614", transform=transform) as dst:
        dst.write(data)
    return path


def footprint(path) -> Polygon:
    with rasterio.open(path) as src:
        return Polygon([src.transform * corner for corner in
                        ((0, 0), (src.width, 0), (src.width, src.height), (0, src.height))])


@pytest.mark.parametrize("pre_transform, post_transform, post_width", [
    (ROTATED, NORTH_UP, 256),   # today: the post is read unresampled, on the pre's rotated lattice
    (NORTH_UP, ROTATED, 256),
    (ROTATED, NORTH_UP, 512),   # today: "operands could not be broadcast"
    (NORTH_UP, SHEARED, 256),   # today: taken as lying on the pre's lattice
    (SOUTH_UP, NORTH_UP, 256),
], ids=["rotated pre", "rotated post", "rotated pre, wider post", "sheared post", "south-up pre"])
def test_rotated_or_sheared_dates_are_warped_onto_a_north_up_grid(tmp_path, pre_transform, post_transform,
                                                                  post_width):
    pre = write_raster(tmp_path / "pre.tif", pre_transform)
    post = write_raster(tmp_path / "post.tif", post_transform, width=post_width, seed=1)
    with rasterio.open(pre) as a, rasterio.open(post) as b:
        grid = common_grid(a, b)
    t = grid.transform
    assert t.b == t.d == 0 and t.a > 0 > t.e
    read = PairReader(pre, post, grid, [1, 2, 3], [1, 2, 3])
    try:
        pre_pixels, post_pixels, valid = read(Window(0, 0, grid.width, grid.height))
    finally:
        read.close()
    # Both dates as GDAL's warper puts them on the grid, and only where both have data.
    for path, pixels in ((pre, pre_pixels), (post, post_pixels)):
        with rasterio.open(path) as src, WarpedVRT(src, crs=grid.crs, transform=t, width=grid.width,
                                                   height=grid.height, resampling=Resampling.bilinear,
                                                   add_alpha=True) as vrt:
            expected, inside = vrt.read([1, 2, 3]), vrt.read(4) > 0
        assert not (valid & ~inside).any()
        np.testing.assert_array_equal(np.where(valid, pixels, 0), np.where(valid, expected, 0))
    # The valid pixels cover the intersection of the two footprints.
    shared = footprint(pre).intersection(footprint(post)).area
    assert valid.sum() * t.a * -t.e == pytest.approx(shared, rel=0.03)


@pytest.mark.parametrize("option, message", [
    (["--crs", "EPSG:999999"], "crs 'EPSG:999999' is not a coordinate reference system GDAL knows"),
    (["--resolution", "1e-12"], "the common grid would be 1.28e+14 x 1.28e+14 px"),  # today: planning eats memory
    (["--threshold", "1.5"], "--threshold must be a number in [0, 1], not 1.5"),
])
def test_cli_refuses_absurd_options_in_one_line(tmp_path, random_package, option, message):
    pre, post = write_raster(tmp_path / "pre.tif", NORTH_UP), write_raster(tmp_path / "post.tif", NORTH_UP, seed=1)
    run = subprocess.run([*GEOCHANGE, "detect", str(pre), str(post), "--model", str(random_package),
                          "--out", str(tmp_path / "out"), *option], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith(f"geochange: error: {message}")
    assert run.stderr.count("\n") == 1


def test_a_resolution_coarser_than_the_overlap_is_named_as_such(tmp_path):
    pre = write_raster(tmp_path / "pre.tif", NORTH_UP)  # 128 m a side
    with rasterio.open(pre) as a, pytest.raises(OptionError, match="resolution 1000 is coarser than the "
                                                                   "overlap of the two rasters \\(128 x 128 in"):
        common_grid(a, a, resolution=1000.0)


def test_a_resolution_equal_to_the_pixel_size_keeps_every_pixel(tmp_path):
    """100 x 70 pixels of 0.1 m, at --resolution 0.1: 7.0 // 0.1 is 69.0 in floating point, and the last row went."""
    place = ("EPSG:32633", Affine(0.1, 0, 500000, 0, -0.1, 5000000), 100, 70)
    path = write_constant(tmp_path / "a.tif", place, 1)
    with rasterio.open(path) as a:
        grid = common_grid(a, a, resolution=0.1)
    assert (grid.width, grid.height) == (100, 70)


def test_an_overlap_a_pixel_wide_across_two_of_the_reference_s_pixels_is_no_overlap(tmp_path):
    """The overlap (0.6 m, the post's one pixel) passed the check, then snapped to the pre's 0.5 m lattice it held
    no whole pixel: a grid 0 px wide, and a ZeroDivisionError."""
    pre = write_raster(tmp_path / "pre.tif", NORTH_UP)
    post = write_raster(tmp_path / "post.tif", Affine(0.6, 0, 630000 + 127.3, 0, -1, 3340000), width=1)
    with rasterio.open(pre) as a, rasterio.open(post) as b, pytest.raises(
            RasterError, match="^the two rasters do not overlap by one whole pixel of pre.tif.\n  pre  pre.tif"):
        common_grid(a, b)


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
def test_a_raster_with_a_mask_band_read_off_its_lattice_is_masked_outside_it_too(tmp_path, dtype):
    """Its mask band masks what it masks, and the warped read marks what lies outside the raster: a warped VRT
    of such a raster without an alpha band of its own is valid everywhere. Of int16 or float, the VRT's alpha band
    takes that type, from which GDAL derives no mask: outside and masked pixels were read as valid zeros."""
    path = write_masked_raster(tmp_path / "masked.tif", dtype)
    finer = Grid(CRS.from_epsg(32633), Affine(0.5, 0, 500040, 0, -0.5, 4999990), 128, 128)  # half-metre pixels
    with rasterio.open(path) as src:
        reader = GridReader(src, finer)
        valid = read_masks(reader, [1], Window(0, 0, 128, 128))[0] > 0
        reader.close()
    assert valid.sum() == 20 * 108 and valid[:108, :20].all()


def test_an_int16_alpha_band_masks_on_the_raster_s_own_grid_as_on_another(tmp_path):
    """GDAL makes no mask of an alpha band that is not byte or uint16: read on its own grid such a raster was valid
    everywhere, warped (where the VRT's alpha band is read) half masked: two dates read two ways."""
    from rasterio.enums import ColorInterp

    path = tmp_path / "alpha16.tif"
    data = np.full((4, 64, 64), 100, np.int16)
    data[3] = 255  # opaque, as GDAL's warper reads an alpha band (255 its full value)
    data[3, :, :32] = 0  # the left half transparent
    with rasterio.open(path, "w", driver="GTiff", width=64, height=64, count=4, dtype="int16", crs="EPSG:32633",
                       transform=Affine(1, 0, 500000, 0, -1, 5000000)) as dst:
        dst.write(data)
        dst.colorinterp = [ColorInterp.gray, ColorInterp.undefined, ColorInterp.undefined, ColorInterp.alpha]
    own = Grid(CRS.from_epsg(32633), Affine(1, 0, 500000, 0, -1, 5000000), 64, 64)
    finer = Grid(CRS.from_epsg(32633), Affine(0.5, 0, 500000, 0, -0.5, 5000000), 128, 128)
    with rasterio.open(path) as src:
        for grid in (own, finer):
            reader = GridReader(src, grid)
            window = Window(0, 0, grid.width, grid.height)
            assert reader.masked
            valid = valid_mask(reader, window, reader.read([1, 2, 3], window), [1, 2, 3], reader.masked)
            reader.close()
            assert valid.mean() == pytest.approx(0.5, abs=0.01), grid


def test_a_crs_gdal_cannot_transform_is_named_in_one_line(tmp_path, capfd):
    """A drone survey in a local (engineering) CRS beside a UTM image: no transformation exists between them."""
    utm = write_raster(tmp_path / "utm.tif", NORTH_UP)
    local = write_raster(tmp_path / "local.tif", NORTH_UP, seed=1)
    with rasterio.open(local, "r+") as dst:
        dst.crs = CRS.from_wkt('LOCAL_CS["drone",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]')
    with rasterio.open(utm) as a, rasterio.open(local) as b:
        with pytest.raises(RasterError, match=re.escape('local.tif (CRS "drone"): GDAL cannot transform to EPSG:32614, '
                                                        "the grid's CRS (a local CRS is tied to no place on Earth)")):
            common_grid(a, b)
        with pytest.raises(RasterError, match=re.escape('utm.tif (CRS EPSG:32614): GDAL cannot transform to "drone", '
                                                        "the grid's CRS (a local CRS")):
            common_grid(b, a)
    assert "ERROR" not in capfd.readouterr().err  # GDAL's own complaint kept off the terminal


@pytest.mark.parametrize("pre_place, post_place, on, valid_share", [
    (FIJI_EAST, FIJI_UTM, "pre", 0.985),  # today: "the two rasters do not overlap"
    (FIJI_WEST, FIJI_UTM, "pre", 0.985),
    (FIJI_EAST, FIJI_WEST, "pre", 1.0),  # one place, its longitudes a turn apart
    (FIJI_EAST, FIJI_UTM, "post", 0.98),  # today: half of the pre missing, its east read as lying at -180°
    (FIJI_WEST, FIJI_UTM, "post", 0.98),
], ids=["east of 180, UTM", "west of -180, UTM", "east and west of 180", "UTM grid, east", "UTM grid, west"])
def test_a_pair_across_the_antimeridian_is_read_where_it_overlaps(tmp_path, pre_place, post_place, on, valid_share):
    pre, post = write_constant(tmp_path / "pre.tif", pre_place, 100), write_constant(tmp_path / "post.tif",
                                                                                     post_place, 200)
    with rasterio.open(pre) as a, rasterio.open(post) as b:
        grid = common_grid(a, b, on=on)
        reference = a if on == "pre" else b
        # On the reference's own lattice, within it: in its own run of longitudes.
        col, row = ~reference.transform * (grid.transform.c, grid.transform.f)
        assert grid.transform.a == reference.transform.a and col == pytest.approx(round(col)) and 0 <= col < 2
        assert row == pytest.approx(round(row)) and 0 <= row < 2 and grid.width >= 0.85 * reference.width
    read = PairReader(pre, post, grid, [1, 2, 3], [1, 2, 3])
    try:
        pre_pixels, post_pixels, valid = read(Window(0, 0, grid.width, grid.height))
    finally:
        read.close()
    assert valid.mean() >= valid_share
    assert (pre_pixels[:, valid] == 100).all() and (post_pixels[:, valid] == 200).all()


def test_a_date_in_another_datum_across_the_antimeridian_keeps_its_datum_shift(tmp_path):
    """Fiji 1986 (EPSG:4720) is not WGS84: read with its longitudes wrapped it is placed as GDAL places it (where
    the plain warp reaches it, west of 180°), and east of 180° too."""
    data = np.tile(np.arange(400, dtype=np.float32), (1, 200, 1))  # each column its index
    crs, transform, width, height = FIJI_EAST
    path = tmp_path / "fiji1986.tif"
    with rasterio.open(path, "w", driver="GTiff", width=width, height=height, count=1, dtype="float32",
                       crs="EPSG:4720", transform=transform) as dst:
        dst.write(data)
    grid, window = Grid(CRS.from_string(crs), transform, width, height), Window(0, 0, width, height)
    with rasterio.open(path) as src:
        reader = GridReader(src, grid)
        ours, inside = reader.read([1], window)[0], reader.read_masks([1], window)[0] > 0
        reader.close()
        with WarpedVRT(src, crs=grid.crs, transform=transform, width=width, height=height,
                       resampling=Resampling.bilinear, add_alpha=True) as vrt:
            plain, reached = vrt.read(1), vrt.read(2) > 0
    assert inside.all() and 0.4 < reached.mean() < 0.6
    np.testing.assert_allclose(ours[reached], plain[reached], atol=1e-3)
    assert abs(ours[100, 100] - 100) > 0.2  # the datum shift moves it by about 16 m (0.3 px)


@pytest.mark.parametrize("polygon_crs, corners, columns", [
    ("EPSG:32701", ((179.95, -16.98), (180.05, -16.92)), (100, 300)),  # across 180° in UTM: today a GEOS error
    ("EPSG:4269", ((-180.0, -17.0), (-179.95, -16.9)), (200, 300)),  # NAD83, west of -180°: today "does not overlap"
    ("EPSG:4326", ((-180.0, -17.0), (-179.95, -16.9)), (200, 300)),
])
def test_an_area_of_interest_lies_on_a_grid_past_the_antimeridian(tmp_path, polygon_crs, corners, columns):
    from pyproj import Transformer

    from geochange.engine.aoi import area_of_interest

    (west, south), (east, north) = corners
    ring = box(west, south, east, north).exterior
    to_file = Transformer.from_crs("EPSG:4326", polygon_crs, always_xy=True)
    polygon = Polygon([to_file.transform(x, y) for x, y in shapely.segmentize(ring, 0.001).coords])
    path = write_polygons(tmp_path / "aoi.gpkg", [mapping(polygon)], int(polygon_crs.split(":")[1]))
    crs, transform, width, height = FIJI_EAST
    grid = Grid(CRS.from_string(crs), transform, width, height)
    aoi = area_of_interest(str(path), grid)
    inside = aoi.mask(Window(0, 0, width, height), grid)
    assert inside[100, columns[0] + 2:columns[1] - 2].all() and not inside[:, :columns[0] - 2].any()
    assert not inside[:, columns[1] + 2:].any()
    cropped = aoi.crop(grid)  # the run's grid follows the area
    assert abs(cropped.width - (columns[1] - columns[0])) <= 2


def test_large_areas_of_interest_on_a_grid_past_the_antimeridian(tmp_path):
    """A land layer's outlines reach far from the grid: a ring round the Earth in degrees (as Antarctica's); a box
    across 180° in Pacific Mercator; a box from 10° W to 180° (its part west of 180° only); Fiji 1986's degrees, cut
    at 180° (its datum shift moves 180° a hair east); in Web Mercator, England beside an Aleutian box (England, across
    Greenwich, must not fold onto the grid); and far boxes, in degrees and in UTM (refused)."""
    from pyproj import Transformer

    from geochange.engine.aoi import area_of_interest

    def projected(geometry, epsg):
        to = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
        return Polygon([to.transform(x, y) for x, y in shapely.segmentize(geometry.exterior, 0.5).coords])

    crs, transform, width, height = FIJI_EAST
    fiji = Grid(CRS.from_string(crs), transform, width, height)
    aleutians = Grid(CRS.from_epsg(4326), Affine(0.01, 0, 175, 0, -0.01, 53), 1000, 300)  # 175°..185° E
    metres = 20037508.34  # Web Mercator's x at 180°
    england_and_aleutians = MultiPolygon([projected(box(-5, 50, 2, 53), 3857),
                                          Polygon(projected(box(178, 51, 180, 52), 3857)),
                                          Polygon([(x - 2 * metres if x > 0 else x, y) for x, y in
                                                   projected(box(180, 51, 182, 52), 3857).exterior.coords])])
    cases = (("band", box(-180, -40, 180, 10), 4326, fiji, (0, 400), (0, 200)),
             ("pacific", projected(box(150, -30, 210, 0), 3832), 3832, fiji, (0, 400), (0, 200)),
             ("west", box(-10, -30, 180, 0), 4326, fiji, (0, 200), (0, 200)),
             ("fiji1986", box(179.5, -17.5, 180, -16.5), 4720, fiji, (0, 200), (0, 200)),
             ("mercator", england_and_aleutians, 3857, aleutians, (300, 700), (100, 200)))
    for name, geometry, epsg, grid, columns, rows in cases:
        path = write_polygons(tmp_path / f"{name}.gpkg", [mapping(geometry)], epsg)
        inside = area_of_interest(str(path), grid).mask(Window(0, 0, grid.width, grid.height), grid)
        core = inside[rows[0] + 2:rows[1] - 2, columns[0] + 2:columns[1] - 2]
        assert core.all() and inside.sum() <= (columns[1] - columns[0] + 4) * (rows[1] - rows[0] + 4), name
    for name, geometry, epsg in (("far", box(-5, 42, 8, 51), 4326), ("far_utm", projected(box(-171, -17, -170, -16),
                                                                                          32701), 32701)):
        path = write_polygons(tmp_path / f"{name}.gpkg", [mapping(geometry)], epsg)
        with pytest.raises(RasterError, match=f"{name}.gpkg: the area of interest does not overlap the rasters"):
            area_of_interest(str(path), fiji)


def test_a_detection_across_the_antimeridian_writes_its_outputs_there(tmp_path, random_package):
    pre, post = write_constant(tmp_path / "pre.tif", FIJI_EAST, 100), write_constant(tmp_path / "post.tif",
                                                                                     FIJI_UTM, 200)
    out = tmp_path / "out"
    out.mkdir()
    result = detect(pre, post, random_package, probability=out / "p.tif", mask=out / "m.tif",
                    polygons=out / "c.gpkg", threshold=0.0)  # every valid pixel changed: one polygon
    with rasterio.open(out / "p.tif") as probability:
        assert probability.bounds == pytest.approx((179.9, -17.0, 180.1, -16.9))
        assert (probability.read_masks(1) > 0).mean() >= 0.985
    assert result.polygon_count == 1
    assert result.changed_area_m2 == pytest.approx(0.985 * 21.29e3 * 11.12e3, rel=0.03)
    # An area of interest and a reference map in longitudes west of -180° lie on the grid east of 180° too.
    aoi = write_polygons(tmp_path / "aoi.gpkg", [mapping(box(-180.0, -17.0, -179.95, -16.9))], 4326)
    east = detect(pre, post, random_package, probability=out / "p2.tif", mask=out / "m2.tif",
                  polygons=out / "c2.gpkg", threshold=0.0, aoi=str(aoi))
    assert east.changed_area_m2 == pytest.approx(0.25 * 21.29e3 * 11.12e3, rel=0.03)
    values, covered = raster_on(str(write_constant(tmp_path / "reference.tif", FIJI_WEST, 1)), result.grid)
    assert covered.all() and (values == 1).all()


def test_two_dates_in_one_local_crs_are_paired_and_measured_in_its_unit(tmp_path, random_package):
    """A drone survey's two flights in the site's own frame: no transformation is needed, and areas are planar
    in its metres (before: "GDAL cannot transform", then a raw PROJ error where polygons were measured)."""
    site = CRS.from_wkt('LOCAL_CS["site grid",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]')
    dates = [write_raster(tmp_path / f"{name}.tif", NORTH_UP, seed=seed) for seed, name in enumerate(("pre", "post"))]
    for path in dates:
        with rasterio.open(path, "r+") as dst:
            dst.crs = site
    out = tmp_path / "out"
    out.mkdir()
    result = detect(*dates, random_package, probability=out / "p.tif", mask=out / "m.tif", polygons=out / "c.gpkg",
                    threshold=0.0)  # every pixel changed: the whole 128 m square
    assert result.polygon_count == 1 and result.changed_area_m2 == pytest.approx(128 * 128)


def test_an_area_of_interest_in_a_crs_with_no_way_to_the_grid_s_is_named_in_one_line(tmp_path):
    """Polygons in degrees over a grid in a site's own frame were a raw PROJ traceback."""
    site = CRS.from_wkt('LOCAL_CS["site grid",UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]')
    aoi = tmp_path / "aoi.gpkg"
    write_polygons(aoi, [mapping(box(10, 50, 10.001, 50.001))], 4326, "aoi")
    grid = Grid(site, NORTH_UP, 256, 256)
    with pytest.raises(RasterError, match=re.escape(
            f"{aoi}: the area of interest is in EPSG:4326, which cannot be transformed to the rasters' CRS, "
            '"site grid" (a local CRS is tied to no place on Earth); give it in the rasters\' CRS')):
        area_of_interest(str(aoi), grid)


def test_a_geocentric_crs_and_an_area_of_interest_holding_no_pixel_are_named(tmp_path, random_package):
    """Both ran to 'no pixel is valid in both ... (nodata everywhere)', which blamed the rasters."""
    pre, post = write_raster(tmp_path / "pre.tif", NORTH_UP), write_raster(tmp_path / "post.tif", NORTH_UP, seed=1)
    with rasterio.open(pre) as a, rasterio.open(post) as b, pytest.raises(
            OptionError, match="crs 'EPSG:4978' is geocentric"):
        common_grid(a, b, crs="EPSG:4978")
    sliver = write_polygons(tmp_path / "sliver.gpkg", [mapping(box(630010.3, 3339900, 630010.4, 3339990))], 32614)
    out = tmp_path / "out"
    with pytest.raises(RasterError, match=re.escape(f"inside the area of interest {sliver} (nodata everywhere, or "
                                                    "the area holds no pixel's centre)")):
        detect(pre, post, random_package, probability=out / "p.tif", mask=out / "m.tif", polygons=out / "c.gpkg",
               aoi=str(sliver))
    assert not out.exists()


def test_thresholds_outside_0_1_are_refused_by_the_engine(tmp_path, random_package):
    pre, post = write_raster(tmp_path / "pre.tif", NORTH_UP), write_raster(tmp_path / "post.tif", NORTH_UP, seed=1)
    for threshold in (-0.1, 1.5, float("nan")):
        with pytest.raises(OptionError, match=r"--threshold must be a number in \[0, 1\]"):
            prepare(pre, post, random_package, DetectOptions(threshold=threshold))
        with pytest.raises(OptionError, match=r"--threshold must be a number in \[0, 1\]"):
            evaluate_folder(load_package(random_package), tmp_path, threshold=threshold)
    assert prepare(pre, post, random_package, DetectOptions(threshold=1)).threshold == 1.0


def test_tiles_below_32_px_are_refused(shared_data, random_package):
    with pytest.raises(OptionError, match="--tile must be at least 32 px, not 31"):
        WindowPlan(256, 256, 31, 0)
    assert len(WindowPlan(256, 256, 32, 0)) == 64
    # Also where every image fits in the tile and is predicted whole, without a window plan.
    with pytest.raises(OptionError, match="--tile must be a whole number at least 32 px, not 16"):
        evaluate_folder(load_package(random_package), shared_data / "levir_cd", tile=16)


def empty_raster(path, width, height):
    """A 3-band raster of any size that costs nothing: a VRT without sources (read as zeros)."""
    dataset = gdal.GetDriverByName("VRT").Create(str(path), width, height, 3, gdal.GDT_Byte)
    dataset.SetGeoTransform(NORTH_UP.to_gdal())
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32614)
    dataset.SetProjection(srs.ExportToWkt())
    dataset.FlushCache()
    return path


def test_a_batch_beyond_the_machines_memory_is_lowered_and_a_tile_refused(tmp_path, random_package):
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    window = 1024 * 1024 * 6 * 4  # float32 input of a 1024 px window, 3 bands a date
    # A 1024 px high grid holding more windows in a row than the machine's memory does.
    wide = empty_raster(tmp_path / "wide.vrt", (memory // window + 1) * 960 + 64, 1024)
    messages = []

    class Log(Progress):
        def log(self, message):
            messages.append(message)

    twin = shutil.copy(wide, tmp_path / "twin.vrt")
    setup = prepare(wide, twin, random_package, DetectOptions(tile=1024, batch=10**9), progress=Log())
    assert 1 <= setup.batch < memory // window and any("batch lowered from 1000000000 to" in m for m in messages)
    side = math.isqrt(memory // (6 * 4)) + 1  # one window of this side holds more than the memory
    square = empty_raster(tmp_path / "square.vrt", side, side)
    with pytest.raises(OptionError, match=f"a tile of {side} px over a grid {side} px wide needs at least .* GiB, "
                                          "more than this machine's .* lower the tile size"):
        prepare(square, shutil.copy(square, tmp_path / "square_twin.vrt"), random_package, DetectOptions(tile=side))


def test_one_file_as_both_dates_is_refused(tmp_path, random_package):
    """Given twice, or once through a link, a raster would only report no change after the whole run."""
    pre = write_raster(tmp_path / "pre.tif", NORTH_UP)
    (tmp_path / "link.tif").symlink_to(pre)
    for post in (pre, tmp_path / "link.tif"):
        run = subprocess.run([*GEOCHANGE, "detect", str(pre), str(post), "--model", str(random_package),
                              "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2
        assert run.stderr == f"geochange: error: {pre}: the pre and the post raster are the same file; a change " \
                             "map needs two dates\n"
    assert not (tmp_path / "out").exists()


def test_an_output_that_names_an_input_or_another_output_is_refused(tmp_path, random_package):
    """An output named as a date's raster or the area of interest would replace it when the run ends; two outputs
    named alike would leave one of them. Refused before any window runs, with every file as it was."""
    pre, post = write_raster(tmp_path / "pre.tif", NORTH_UP), write_raster(tmp_path / "post.tif", NORTH_UP, seed=1)
    aoi = write_polygons(tmp_path / "aoi.gpkg", [mapping(box(630010, 3339880, 630100, 3339990))], 32614)
    (tmp_path / "link.tif").symlink_to(pre)
    before = {path: path.read_bytes() for path in (pre, post, aoi)}
    outputs = {"probability": tmp_path / "p.tif", "mask": tmp_path / "m.tif", "polygons": tmp_path / "c.gpkg"}
    for role, taken in (("probability", tmp_path / "link.tif"), ("mask", post), ("polygons", aoi)):
        with pytest.raises(OutputError, match=f"^{re.escape(str(taken))}: this output is also an input of the run "):
            detect(pre, post, random_package, **dict(outputs, **{role: taken}), aoi=str(aoi))
    twice = tmp_path / "elsewhere" / ".." / "p.tif"  # the probability's file, spelt otherwise
    with pytest.raises(OutputError, match=f"^{re.escape(str(twice))}: named for two outputs of the run"):
        detect(pre, post, random_package, **dict(outputs, mask=twice))
    with pytest.raises(OutputError, match=f"^{re.escape(str(aoi))}: this output is also an input of the run "):
        # The area of interest as QGIS gives it.
        detect(pre, post, random_package, **dict(outputs, polygons=aoi), aoi=f"{aoi}|layername=reference")
    assert {path: path.read_bytes() for path in (pre, post, aoi)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aoi.gpkg", "link.tif", "post.tif", "pre.tif"]

    # On the command line, a date read from the output folder under an output's name.
    out = tmp_path / "out"
    out.mkdir()
    earlier = shutil.copy(pre, out / "change_probability.tif")
    run = subprocess.run([*GEOCHANGE, "detect", str(earlier), str(post), "--model", str(random_package),
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == f"geochange: error: {earlier}: this output is also an input of the run ({earlier}); " \
                         "choose another name for it\n"
    assert earlier.read_bytes() == before[pre] and sorted(p.name for p in out.iterdir()) == ["change_probability.tif"]


def test_outputs_of_the_other_commands_that_name_their_inputs_are_refused(tmp_path, shared_data, random_package,
                                                                        capsys):
    """evaluate's JSON over a label of its dataset or over a zoo model named by its name, detect-many's summary over
    its list of pairs, and Vectorise's polygons over the GeoPackage of its raster each replaced what they read."""
    from geochange.engine.cli import main
    from geochange.engine.zoo import zoo_path
    from geochange.engine.vectorize import vectorize_probability

    data = tmp_path / "data"
    for folder in ("A", "B", "label"):
        (data / folder).mkdir(parents=True)
        shutil.copy(shared_data / "ombria" / folder / "test_0013.png", data / folder)
    label = data / "label" / "test_0013.png"
    zoo_model = zoo_path("tinycd_flood")
    before = {path: path.read_bytes() for path in (label, zoo_model)}
    try:
        for model, taken in ((random_package, label), ("tinycd_flood", zoo_model)):
            assert main(["evaluate", "--model", str(model), "--data", str(data), "--json", str(taken)]) == 2
            assert capsys.readouterr().err.startswith(f"geochange: error: {taken}: this output is also an input")
    finally:
        changed = [path for path, content in before.items() if path.read_bytes() != content]
        for path in changed:
            path.write_bytes(before[path])
    assert not changed

    pre, post = write_raster(tmp_path / "pre.tif", NORTH_UP), write_raster(tmp_path / "post.tif", NORTH_UP, seed=1)
    out = tmp_path / "many"
    out.mkdir()
    pairs = out / "summary.csv"
    pairs.write_text(f"pre,post,name\n{pre},{post},one\n")
    listed = pairs.read_text()
    assert main(["detect-many", str(pairs), "--out", str(out), "--model", str(random_package)]) == 2
    assert capsys.readouterr().err.startswith(f"geochange: error: {pairs}: this output is also an input")
    assert pairs.read_text() == listed and sorted(p.name for p in out.iterdir()) == ["summary.csv"]

    stack = tmp_path / "stack.gpkg"
    gdal.Translate(str(stack), str(pre), format="GPKG", bandList=[1], outputType=gdal.GDT_Float32)
    held = stack.read_bytes()
    with pytest.raises(OutputError, match=f"^{re.escape(str(stack))}: this output is also an input"):
        vectorize_probability(str(stack), str(stack))
    assert stack.read_bytes() == held


def test_pixels_far_from_the_model_s_are_pointed_out(levir_crop, tinycd_package):
    """The TinyCD authors' model saw 0.5 m LEVIR-CD pixels: at 10 m the run says so, and how to read both
    dates at 0.5 m; at the crop's own ~0.55 m it says nothing."""
    class Log(Progress):
        def __init__(self):
            self.lines = []

        def log(self, message):
            self.lines.append(message)

    native, coarse = Log(), Log()
    prepare(levir_crop["pre"], levir_crop["post"], tinycd_package, DetectOptions(device="cpu"), progress=native)
    prepare(levir_crop["pre"], levir_crop["post"], tinycd_package,
            DetectOptions(device="cpu", resolution=10 / 111_320), progress=coarse)
    assert not any("the model was trained on" in line for line in native.lines), native.lines
    [warning] = [line for line in coarse.lines if "the model was trained on 0.5 m pixels" in line]
    assert "(18.6 times coarser)" in warning and "--resolution model reads both dates at the model's" in warning
    # The resolution it suggests (degrees here) gives the model's 0.5 m pixels: no warning then.
    suggested, at_model = float(warning.split("(--resolution ")[1].split()[0]), Log()
    setup = prepare(levir_crop["pre"], levir_crop["post"], tinycd_package,
                    DetectOptions(device="cpu", resolution=suggested), progress=at_model)
    assert setup.grid.pixel_metres() == pytest.approx(0.5, rel=1e-4)
    assert not any("the model was trained on" in line for line in at_model.lines)
