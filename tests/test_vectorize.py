"""Polygons from a hand-made mask: areas in m2 in projected and geographic CRSs, attributes, GPKG."""
import numpy as np
import pytest
from osgeo import ogr
from pyproj import CRS, Transformer
from rasterio.transform import from_origin
import shapely

from geochange.engine import measures
from geochange.engine.measures import METRES_PER_DEGREE, map_units
from geochange.engine.vectorize import PolygonAssembler, change_polygons, simplified, write_polygons


def hand_mask():
    mask = np.zeros((60, 80), bool)
    mask[10:30, 10:40] = True          # 600 px block ...
    mask[15:25, 20:30] = False         # ... with a 100 px hole: 500 px
    mask[40:45, 60:70] = True          # 50 px block
    prob = np.where(mask, 0.7, 0.1).astype(np.float32)
    prob[40, 60] = 0.95
    return mask, prob


def laea_area(geometry, crs) -> float:
    """An independent check: planar area in a Lambert equal-area projection centred on the shape."""
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    lonlat = shapely.transform(geometry, to_lonlat.transform, interleaved=False)
    c = lonlat.centroid
    laea = CRS.from_proj4(f"+proj=laea +lat_0={c.y} +lon_0={c.x} +datum=WGS84 +units=m")
    to_laea = Transformer.from_crs(crs, laea, always_xy=True)
    return shapely.transform(geometry, to_laea.transform, interleaved=False).area


@pytest.mark.parametrize("crs,transform,pixel_m2", [
    ("EPSG:32614", from_origin(630000, 3340000, 0.5, 0.5), 0.25),        # UTM 14N near the meridian
    ("EPSG:4326", from_origin(-97.98, 30.21, 5e-6, 5e-6), None),          # degrees, LEVIR's location
])
def test_area_in_square_metres_whatever_the_crs(crs, transform, pixel_m2):
    mask, prob = hand_mask()
    polygons = sorted(change_polygons(mask, prob, transform, crs), key=lambda p: -p.area_m2)
    assert len(polygons) == 2
    big, small = polygons
    assert len(big.geometry.interiors) == 1  # the hole is kept
    for polygon, pixels in ((big, 500), (small, 50)):
        assert polygon.area_m2 == pytest.approx(laea_area(polygon.geometry, crs), rel=1e-3)
        if pixel_m2:  # UTM: within the point scale factor (0.9996) of the planar pixel area
            assert polygon.area_m2 == pytest.approx(pixels * pixel_m2, rel=2e-3)
    assert big.mean_prob == pytest.approx(0.7) and big.max_prob == pytest.approx(0.7)
    assert small.max_prob == pytest.approx(0.95)
    assert small.mean_prob == pytest.approx((0.95 + 49 * 0.7) / 50)


def test_min_area_and_simplify():
    mask, prob = hand_mask()
    transform = from_origin(630000, 3340000, 0.5, 0.5)
    kept = change_polygons(mask, prob, transform, "EPSG:32614", min_area_m2=20)
    assert len(kept) == 1 and kept[0].area_m2 > 100
    diagonal = np.tri(40, 40, dtype=bool)  # a staircase edge that simplification straightens
    rough = change_polygons(diagonal, diagonal.astype(np.float32), transform, "EPSG:32614")[0]
    smooth = change_polygons(diagonal, diagonal.astype(np.float32), transform, "EPSG:32614", simplify=1.0)[0]
    assert len(smooth.geometry.exterior.coords) < len(rough.geometry.exterior.coords) / 5
    assert smooth.geometry.is_valid


def test_simplifying_keeps_every_polygon_whole_where_ring_by_ring_simplification_would_not():
    """Douglas-Peucker on each ring is checked: a hole it would push across the straightened outline, or
    shrink to nothing, sends that polygon through the topology-preserving simplifier."""
    outline = [(0, 0), (10, 0), (10, 10), (5, 11), (0, 10)]  # a bump of 1 under a tolerance of 1.5
    crossing = shapely.Polygon(outline, [[(4, 7), (6, 7), (6, 10.5), (4, 10.5)]])  # reaches into the bump
    speck = shapely.Polygon(outline, [[(2, 2), (2.5, 2), (2.5, 2.5)]])
    plain = shapely.Polygon([(0, 0), (10, 0), (10, 10), (5, 10.5), (0, 10)])
    polygons = np.array([crossing, speck, plain])
    assert [len(p.interiors) for p in shapely.simplify(polygons, 1.5, preserve_topology=False)] == [0, 0, 0]
    out = simplified(polygons, 1.5)
    assert [p.geom_type for p in out] == ["Polygon"] * 3 and shapely.is_valid(out).all()
    assert [len(p.interiors) for p in out] == [1, 1, 0]
    assert out[2].equals_exact(shapely.Polygon([(0, 0), (10, 0), (10, 10), (0, 10)]), 0)  # the bump went


def test_the_simplify_tolerance_is_in_metres_whatever_the_crs():
    """Degrees (EPSG:4326) and US feet (EPSG:2263) take the tolerance in metres, as areas are: the staircase of
    0.5 m pixels is straightened alike, and 0.5 m in degrees never strays more than 0.5 m from the outline."""
    assert map_units(1.0, "EPSG:32614") == 1.0 and map_units(3.0, None) == 3.0  # a pixel grid: pixels
    assert map_units(0.3048006096, "EPSG:2263") == pytest.approx(1.0)
    assert map_units(METRES_PER_DEGREE, "EPSG:4326") == 1.0
    diagonal = np.tri(40, 40, dtype=bool)
    degree = 0.5 / METRES_PER_DEGREE  # 0.5 m pixels at the equator
    for transform, crs in ((from_origin(630000, 3340000, 0.5, 0.5), "EPSG:32614"),
                           (from_origin(10.0, 0.0, degree, degree), "EPSG:4326")):
        rough = change_polygons(diagonal, diagonal.astype(np.float32), transform, crs)[0].geometry
        smooth = change_polygons(diagonal, diagonal.astype(np.float32), transform, crs, simplify=1.0)[0].geometry
        assert len(smooth.exterior.coords) < len(rough.exterior.coords) / 5, crs
        strays = smooth.hausdorff_distance(rough) * (METRES_PER_DEGREE if crs == "EPSG:4326" else 1)
        assert 0.3 < strays <= 1.0, (crs, strays)


def test_empty_mask_gives_no_polygon():
    assert change_polygons(np.zeros((5, 5), bool), np.zeros((5, 5)), from_origin(0, 0, 1, 1), "EPSG:32614") == []


def test_geopackage_read_back_by_ogr(tmp_path):
    mask, prob = hand_mask()
    polygons = change_polygons(mask, prob, from_origin(630000, 3340000, 0.5, 0.5), "EPSG:32614")
    path = write_polygons(polygons, tmp_path / "out.gpkg", "EPSG:32614")
    source = ogr.Open(str(path))
    layer = source.GetLayer()
    assert layer.GetFeatureCount() == 2
    assert layer.GetSpatialRef().GetAuthorityCode(None) == "32614"
    names = [layer.GetLayerDefn().GetFieldDefn(i).GetName() for i in range(layer.GetLayerDefn().GetFieldCount())]
    assert names == ["id", "area_m2", "mean_prob", "max_prob"]
    areas = sorted(f.GetField("area_m2") for f in layer)
    assert areas == pytest.approx(sorted(p.area_m2 for p in polygons))
    assert [p.name for p in tmp_path.iterdir()] == ["out.gpkg"]  # no temporaries left


def shapes_and_specks():
    rng = np.random.default_rng(3)
    mask = np.zeros((90, 70), bool)
    mask[5:80, 10:20] = True            # a tall bar crossing every seam
    mask[30:60, 30:60] = True           # a block with a hole ...
    mask[40:50, 40:50] = False
    mask[58:62, 20:30] = True           # ... joined to the bar across a seam at row 60
    mask[85:90, 65:70] = True           # touches the last row
    return mask | (rng.random(mask.shape) > 0.97)  # specks everywhere


def noise():
    """What a model with random weights outlines: regions spanning every band, riddled with holes,
    touching themselves and each other corner to corner across the seams."""
    return np.random.default_rng(5).random((90, 70)) > 0.45


@pytest.mark.parametrize("make_mask", [shapes_and_specks, noise])
def test_regions_crossing_band_seams_come_out_whole(make_mask):
    rng = np.random.default_rng(3)
    mask = make_mask()
    prob = np.where(mask, rng.uniform(0.5, 1, mask.shape), 0.1)
    transform, crs = from_origin(630000, 3340000, 0.5, 0.5), "EPSG:32614"
    whole = change_polygons(mask, prob, transform, crs)
    for band in (7, 10, 30):
        assembler = PolygonAssembler(transform, crs)
        banded = []
        for start in range(0, 90, band):
            banded += assembler.add_band(start, mask[start:start + band], prob[start:start + band])
        banded += assembler.finish()
        assert len(banded) == len(whole)
        tree = shapely.STRtree([b.geometry for b in banded])
        for a in whole:  # each whole polygon has its equal among the banded ones, with its statistics
            same = [banded[i] for i in tree.query(a.geometry, predicate="covers")
                    if banded[i].geometry.equals(a.geometry)]
            assert len(same) == 1, a.geometry.wkt
            b = same[0]
            assert a.area_m2 == pytest.approx(b.area_m2) and a.mean_prob == pytest.approx(b.mean_prob)
            assert a.max_prob == b.max_prob
        # One winding a polygon, GeoJSON's: exteriors counter-clockwise, holes clockwise (the seams' unions and
        # GDAL's polygonizer left them mixed, and geodesic measures of the written rings read them wrong).
        for polygon in (p.geometry for p in banded + whole):
            assert shapely.is_ccw(polygon.exterior) and not any(shapely.is_ccw(ring) for ring in polygon.interiors)
    assert any(p.geometry.interiors for p in whole)


@pytest.mark.parametrize("band", [12, 7, 2])
def test_a_small_hole_holding_nodata_is_not_filled(band):
    transform = from_origin(630000, 3340000, 0.5, 0.5)
    mask, invalid = np.zeros((12, 12), bool), np.zeros((12, 12), bool)
    mask[1:11, 1:11] = True
    mask[3:5, 3:5] = False  # a valid 1 m2 gap: filled
    mask[6:9, 6:9] = False  # a 2.25 m2 gap around one invalid pixel: kept, whatever band seams cut it
    invalid[7, 7] = True
    assembler = PolygonAssembler(transform, "EPSG:32614", min_area_m2=5.0)
    polygons = []
    for start in range(0, 12, band):
        rows = slice(start, start + band)
        polygons += assembler.add_band(start, mask[rows], mask[rows].astype(float), ~invalid[rows])
    polygons += assembler.finish()
    assert len(polygons) == 1
    polygon = polygons[0].geometry
    assert len(polygon.interiors) == 1 and polygon.area == pytest.approx((100 - 9) * 0.25)
    x, y = transform * (7.5, 7.5)
    assert not polygon.intersects(shapely.Point(x, y))


@pytest.mark.parametrize("make_mask", [shapes_and_specks, noise])
def test_small_holes_are_filled_unless_they_hold_nodata_whatever_the_seams(make_mask):
    rng = np.random.default_rng(11)
    invalid = rng.random((90, 70)) > 0.97
    mask = make_mask() & ~invalid
    prob = np.where(mask, 0.8, 0.1)
    transform, crs, min_area = from_origin(630000, 3340000, 0.5, 0.5), "EPSG:32614", 2.1  # no hole near 2.1 m2
    rows, cols = np.nonzero(invalid)
    nodata = shapely.points(np.stack(transform * (cols + 0.5, rows + 0.5), axis=1))
    # Expected, from the unfilled polygons: each hole stays if it is large or holds a nodata pixel.
    expected = []
    for p in change_polygons(mask, prob, transform, crs):
        if p.area_m2 >= min_area:
            holes = [shapely.Polygon(h) for h in p.geometry.interiors]
            kept = [h.exterior for h in holes if h.area >= min_area or shapely.contains(h, nodata).any()]
            expected.append(shapely.Polygon(p.geometry.exterior, kept))
    assert sum(len(e.interiors) for e in expected) > 0
    tree = shapely.STRtree(expected)
    for band in (90, 30, 10, 7):
        assembler = PolygonAssembler(transform, crs, min_area_m2=min_area)
        found = []
        for start in range(0, 90, band):
            found += assembler.add_band(start, mask[start:start + band], prob[start:start + band],
                                        ~invalid[start:start + band])
        found += assembler.finish()
        assert len(found) == len(expected)
        for p in found:  # the merged polygons have extra vertices on the seams: compared as shapes
            assert sum(p.geometry.equals(expected[i]) for i in tree.query(p.geometry)) == 1, p.geometry.wkt
            assert not shapely.intersects(p.geometry, nodata).any()


def test_points_kept_for_nodata_holes_do_not_grow_with_the_nodata():
    """Two regions as tall as the raster, scattered nodata around them: only the patch between them
    could yet be a hole, one point a band, whatever the number of nodata specks."""
    invalid = np.random.default_rng(2).random((400, 60)) > 0.9
    mask = np.zeros((400, 60), bool)
    mask[:, 10:20] = mask[:, 40:50] = True
    invalid &= ~mask
    assembler = PolygonAssembler(from_origin(630000, 3340000, 0.5, 0.5), "EPSG:32614", min_area_m2=1.0)
    for start in range(0, 400, 10):
        assembler.add_band(start, mask[start:start + 10], mask[start:start + 10].astype(float),
                           ~invalid[start:start + 10])
        assert len(assembler._invalid_rows) <= start // 10 + 1
    assert len(assembler.finish()) == 2


def test_holes_and_specks_below_min_area_are_dropped():
    mask = np.zeros((40, 40), bool)
    mask[5:35, 5:35] = True
    mask[10:12, 10:12] = False          # 1 m2 hole: filled
    mask[20:30, 20:30] = False          # 25 m2 hole: kept
    mask[38, 38] = True                 # 0.25 m2 speck: dropped
    polygons = change_polygons(mask, mask.astype(float), from_origin(630000, 3340000, 0.5, 0.5), "EPSG:32614",
                               min_area_m2=2.0)
    assert len(polygons) == 1 and len(polygons[0].geometry.interiors) == 1


@pytest.mark.parametrize("crs,transform,bounded", [
    ("EPSG:32614", from_origin(630000, 3340000, 0.5, 0.5), True),  # UTM, LEVIR's
    ("EPSG:4326", from_origin(-97.98, 30.21, 5e-6, 5e-6), True),  # degrees, LEVIR's location
    ("EPSG:3413", from_origin(-2e6, 1e6, 30, 30), True),  # polar stereographic
    ("EPSG:3857", from_origin(0, 8e6, 10, 10), True),  # web Mercator at 58° N
    ("EPSG:4326", from_origin(-20, 70, 0.2, 0.2), False),  # degrees from 70° N to 50° S: every ring measured
])
def test_holes_are_told_small_as_their_geodesic_areas_tell_whatever_the_crs(crs, transform, bounded, monkeypatch):
    rng = np.random.default_rng(0)
    corner = rng.integers(0, [4000, 600], (3000, 2))
    boxes = shapely.box(*corner.T, *(corner + rng.integers(1, 16, (3000, 2))).T)
    rings = shapely.get_exterior_ring(boxes)
    to_map = PolygonAssembler(transform, crs)._to_map
    square = shapely.get_exterior_ring(shapely.box([2000], [300], [2001], [301]))
    pixel = measures.ring_areas(shapely.transform(square, to_map), crs)[0]
    limit = 60 * pixel  # rings of 1 to 225 pixels: many near the limit
    expected = measures.ring_areas(shapely.transform(rings, to_map), crs) < limit
    measured, ring_areas = [], measures.ring_areas

    def counted(rings, crs):
        measured.append(len(rings))
        return ring_areas(rings, crs)

    monkeypatch.setattr(measures, "ring_areas", counted)
    assert (measures.rings_below(rings, limit, to_map, crs) == expected).all()
    assert 0 < expected.sum() < len(rings)
    if bounded:  # the pixel's area sampled (9 squares), then only the rings within 10 % of the limit
        near = np.abs(shapely.area(boxes) * pixel / limit - 1) < 0.1
        assert measured[0] == 9 and 0 < measured[1] <= near.sum() < len(rings) / 5
    else:
        assert measured == [9, len(rings)]


def test_a_polygon_s_area_is_its_pixels_whatever_the_simplification():
    """A diagonal staircase of 84 pixels (a thin channel, 0.5 m pixels): simplifying its outline by 0.5 m adds a
    fifth to the outline's area; area_m2 and --min-area keep to the changed pixels'."""
    mask = np.zeros((50, 50), bool)
    for i in range(42):
        mask[i + 2, i + 2:i + 4] = True  # each row's two pixels share an edge with the next row's
    prob = np.where(mask, 0.8, 0.1).astype(np.float32)
    transform = from_origin(630000, 3340000, 0.5, 0.5)
    [plain] = change_polygons(mask, prob, transform, "EPSG:32614")
    [simple] = change_polygons(mask, prob, transform, "EPSG:32614", simplify=0.5)
    assert plain.area_m2 == pytest.approx(84 * 0.25, rel=2e-3) and simple.area_m2 == pytest.approx(plain.area_m2)
    assert simple.geometry.area > 1.1 * plain.geometry.area  # the outline did move
    assert change_polygons(mask, prob, transform, "EPSG:32614", simplify=0.5, min_area_m2=22) == []


def test_geojson_is_refused_a_crs_it_cannot_name(tmp_path):
    """GeoJSON names a CRS by its EPSG code only; without one, readers take the coordinates for degrees."""
    from geochange.engine.errors import OutputError

    mask, prob = hand_mask()
    laea = "+proj=laea +lat_0=45 +lon_0=15 +datum=WGS84 +units=m"
    polygons = change_polygons(mask, prob, from_origin(0, 1000, 0.5, 0.5), laea)
    with pytest.raises(OutputError, match="GeoJSON names a CRS by its code only, and this one .* has none"):
        write_polygons(polygons, tmp_path / "laea.geojson", laea)
    assert list(tmp_path.iterdir()) == []
    write_polygons(polygons, tmp_path / "laea.gpkg", laea)  # a GeoPackage keeps it whole
    utm = "+proj=utm +zone=14 +datum=WGS84 +units=m"  # EPSG:32614 in other words: named by its code
    source = ogr.Open(str(write_polygons(polygons, tmp_path / "utm.geojson", utm)))
    assert source.GetLayer().GetSpatialRef().GetAuthorityCode(None) == "32614"


def test_a_probability_raster_is_vectorised_band_by_band_as_whole(tmp_path, monkeypatch):
    """Vectorise reads a probability raster in bands of whole blocks of rows (its memory then follows the width):
    the polygons are those of the whole mask at once, nodata and NaN never changed."""
    import rasterio

    from geochange.engine import vectorize

    rng = np.random.default_rng(8)
    prob = np.where(noise(), rng.uniform(0.5, 1, (90, 70)), 0.1).astype(np.float32)
    prob[5:9, 3:40] = -1  # detect's nodata
    prob[60:62, :] = np.nan
    transform, crs = from_origin(630000, 3340000, 0.5, 0.5), "EPSG:32614"
    path = tmp_path / "p.tif"
    with rasterio.open(path, "w", driver="GTiff", width=70, height=90, count=1, dtype="float32", crs=crs,
                       transform=transform, nodata=-1, blockysize=16) as dst:
        dst.write(prob, 1)
    valid = (prob != -1) & np.isfinite(prob)
    whole = change_polygons(valid & (prob > 0.5), np.where(valid, prob, 0), transform, crs, valid=valid)
    monkeypatch.setattr(vectorize, "VECTORIZE_ROWS", 20)  # bands of 16 rows: six of them
    bands = []
    add_band = vectorize.PolygonAssembler.add_band
    monkeypatch.setattr(vectorize.PolygonAssembler, "add_band",
                        lambda self, start, *arrays: bands.append(start) or add_band(self, start, *arrays))
    result = vectorize.vectorize_probability(str(path), str(tmp_path / "c.gpkg"))
    assert bands == [0, 16, 32, 48, 64, 80]
    assert result["polygon_count"] == len(whole)
    assert result["changed_area_m2"] == pytest.approx(sum(p.area_m2 for p in whole))
    source = ogr.Open(str(tmp_path / "c.gpkg"))
    written = shapely.union_all([shapely.from_wkt(f.GetGeometryRef().ExportToWkt()) for f in source.GetLayer()])
    assert written.symmetric_difference(shapely.union_all([p.geometry for p in whole])).area < 1e-6


def test_detect_s_outputs_on_a_pixel_grid_are_vectorised_in_pixels(tmp_path):
    """Plain images' outputs have no CRS: areas, --min-area and --simplify in pixels, as detect made them; a
    raster placed by a geotransform but without a CRS gives the same polygons where it places them."""
    import warnings

    import rasterio
    from rasterio.control import GroundControlPoint
    from rasterio.crs import CRS
    from rasterio.errors import NotGeoreferencedWarning

    from geochange.engine.errors import RasterError
    from geochange.engine.grid import PIXEL_TRANSFORM
    from geochange.engine.vectorize import vectorize_probability

    mask, prob = hand_mask()
    for name, transform in (("pixels", PIXEL_TRANSFORM), ("placed", from_origin(1000, 2000, 2, 2))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)  # GDAL may store no transform: as plain
            with rasterio.open(tmp_path / f"{name}.tif", "w", driver="GTiff", width=80, height=60, count=1,
                               dtype="float32", transform=transform) as dst:
                dst.write(prob, 1)
    outlines = {}
    for name in ("pixels", "placed"):
        result = vectorize_probability(str(tmp_path / f"{name}.tif"), str(tmp_path / f"{name}.gpkg"), min_area=60,
                                       simplify=1.5)
        assert (result["polygon_count"], result["changed_area_m2"], result["area_unit"]) == (1, 500.0, "px")
        source = ogr.Open(str(tmp_path / f"{name}.gpkg"))
        outlines[name] = [shapely.from_wkt(f.GetGeometryRef().ExportToWkt()) for f in source.GetLayer()]
    to_placed = (2, 0, 0, 2, 1000, 2000)  # a pixel grid's x, -y to the geotransform's: 2 units a pixel
    assert shapely.equals_exact(shapely.affinity.affine_transform(outlines["pixels"][0], to_placed),
                                outlines["placed"][0], 1e-9)
    with rasterio.open(tmp_path / "pixels.tif", "r+") as dst:  # placed by ground control points only
        dst.gcps = ([GroundControlPoint(0, 0, 15.0, 45.0), GroundControlPoint(60, 80, 15.1, 44.9),
                     GroundControlPoint(0, 80, 15.1, 45.0)], CRS.from_epsg(4326))
    with pytest.raises(RasterError, match="pixels.tif: georeferenced by 3 ground control points only"):
        vectorize_probability(str(tmp_path / "pixels.tif"), str(tmp_path / "e.gpkg"))


def test_vectorise_reports_its_progress_band_by_band(tmp_path):
    """Each band of rows read moves the progress (QGIS's bar stood at 0 % until the end)."""
    import rasterio

    from conftest import Recorded
    from geochange.engine.vectorize import vectorize_probability

    with rasterio.open(tmp_path / "p.tif", "w", driver="GTiff", width=64, height=1100, count=1, dtype="float32",
                       tiled=True, blockxsize=256, blockysize=256, crs="EPSG:32614",
                       transform=from_origin(630000, 3340000, 1, 1)) as dst:
        dst.write(np.linspace(0, 1, 64 * 1100, dtype=np.float32).reshape(1, 1100, 64))
    rows = Recorded()
    vectorize_probability(str(tmp_path / "p.tif"), str(tmp_path / "c.gpkg"), progress=rows)
    assert rows.done == [(512, 1100), (1024, 1100), (1100, 1100)]


def test_the_simplify_tolerance_is_in_metres_on_the_ground_where_the_projection_stretches_them(tmp_path):
    """Web Mercator at 60° N draws a metre on the ground as 2 map units: --simplify 1 (m) is 2 units there. A
    block with a bump 1.5 units (0.75 m on the ground) high loses the bump; it kept it while the tolerance was
    taken as 1 unit."""
    import rasterio

    from geochange.engine.grid import Grid
    from geochange.engine.vectorize import vectorize_probability

    transform = from_origin(1113194.9, 8399737.9, 0.5, 0.5)  # 10° E, 60° N
    assert Grid(CRS.from_epsg(3857), transform, 60, 40).map_scale() == pytest.approx(2.0, rel=1e-3)
    assert Grid(CRS.from_epsg(32633), transform, 60, 40).map_scale() == 1.0  # UTM: its units are the ground's
    assert Grid(CRS.from_epsg(4326), from_origin(10, 60, 1e-5, 1e-5), 60, 40).map_scale() == 1.0  # map_units'
    mask = np.zeros((40, 60), bool)
    mask[10:30, 10:50] = True
    mask[7:10, 28:32] = True  # the bump: 3 pixels of 0.5 units
    profile = {"driver": "GTiff", "width": 60, "height": 40, "count": 1, "dtype": "float32", "crs": "EPSG:3857",
               "transform": transform}
    with rasterio.open(tmp_path / "p.tif", "w", **profile) as dst:
        dst.write(mask.astype(np.float32), 1)
    vectorize_probability(str(tmp_path / "p.tif"), str(tmp_path / "c.gpkg"), simplify=1.0)
    source = ogr.Open(str(tmp_path / "c.gpkg"))  # held: its layer dies with it
    [feature] = source.GetLayer()
    [outline] = shapely.get_parts(shapely.from_wkt(feature.GetGeometryRef().ExportToWkt()))
    assert len(outline.exterior.coords) == 5  # the block's corners alone
