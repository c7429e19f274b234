"""An area of interest limits a run: the grid is cut to its bounds, pixels outside it are nodata, windows
outside it never run; it may be in another CRS than the rasters."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from osgeo import ogr, osr
from pyproj import CRS, Transformer

from geochange.engine.aoi import area_of_interest
from geochange.engine.contracts import MASK_NODATA
from geochange.engine.detect import detect
from geochange.engine.errors import RasterError
from geochange.engine.grid import Grid
from geochange.engine.progress import Progress


def write_layer(path, rings, epsg: int, kind=ogr.wkbPolygon):
    """A GeoPackage layer of polygons (rings of (x, y)) or points, in EPSG:``epsg``."""
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(epsg)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    source = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    layer = source.CreateLayer("area", srs, kind)
    for ring in rings:
        feature = ogr.Feature(layer.GetLayerDefn())
        wkt = (f"POLYGON (({', '.join(f'{x} {y}' for x, y in ring)}))" if kind == ogr.wkbPolygon
               else f"POINT ({ring[0][0]} {ring[0][1]})")
        feature.SetGeometry(ogr.CreateGeometryFromWkt(wkt))
        layer.CreateFeature(feature)
    source = None
    return path


class Log(Progress):
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


def test_an_area_of_interest_in_another_crs_limits_the_run(levir_crop, tinycd_package, tmp_path):
    with rasterio.open(levir_crop["pre"]) as src:
        left, bottom, right, top = src.bounds
        width, height = src.width, src.height
    # A triangle over the crop's lower left quarter, written in Web Mercator.
    lon, lat = (left, left, (left + right) / 2), (bottom, (bottom + top) / 2, bottom)
    x, y = Transformer.from_crs(4326, 3857, always_xy=True).transform(lon, lat)
    aoi = write_layer(tmp_path / "aoi.gpkg", [list(zip(x, y)) + [(x[0], y[0])]], 3857)
    log = Log()
    names = {"probability": "p.tif", "mask": "m.tif", "polygons": "c.gpkg"}
    whole = detect(levir_crop["pre"], levir_crop["post"], tinycd_package, device="cpu", tile=64, overlap=16,
                   **{k: tmp_path / "whole" / v for k, v in names.items()})
    part = detect(levir_crop["pre"], levir_crop["post"], tinycd_package, device="cpu", tile=64, overlap=16,
                  aoi=str(aoi), progress=log, **{k: tmp_path / "part" / v for k, v in names.items()})
    with rasterio.open(whole.mask) as a, rasterio.open(part.mask) as b:
        assert (b.width, b.height) == pytest.approx((width / 2, height / 2), abs=1) and b.crs == a.crs
        inside = b.read(1)
        full = a.read(1, window=rasterio.windows.from_bounds(*b.bounds, a.transform))
    # Outside the triangle (above its diagonal) nodata; inside, the whole run's answer (other windows).
    rows, cols = np.indices(inside.shape)
    above = rows < cols - 2
    below = rows > cols + 2
    assert (inside[above] == MASK_NODATA).all()
    assert (inside[below] != MASK_NODATA).all() and np.mean(inside[below] == full[below]) > 0.97
    # The time follows the area: 3 x 3 windows of 64 px at stride 48 over the quarter, against 5 x 5.
    assert any(line.startswith("area of interest") for line in log.lines)
    assert any(" px in EPSG:4326: 9 windows of 64x64 px" in line for line in log.lines), log.lines
    assert part.polygon_count <= whole.polygon_count


def test_an_area_of_interest_must_hold_polygons_that_meet_the_rasters(levir_crop, random_package, tmp_path):
    names = {"probability": tmp_path / "p.tif", "mask": tmp_path / "m.tif", "polygons": tmp_path / "c.gpkg"}
    far = write_layer(tmp_path / "far.gpkg", [[(0, 0), (0, 1), (1, 1), (0, 0)]], 4326)
    points = write_layer(tmp_path / "points.gpkg", [[(0, 0)]], 4326, ogr.wkbPoint)
    for aoi, message in ((far, "the area of interest does not overlap the rasters"),
                         (points, r"no polygon in the area of interest \(1 other features\)"),
                         (tmp_path / "none.gpkg", "no such file"),
                         (f"{far}|layername=other", f"{far}: no layer 'other' \\(the area of interest\\); its layers: "
                                                    "area"),
                         (levir_crop["pre"], "not a vector layer GDAL can read")):
        with pytest.raises(RasterError, match=message):
            detect(levir_crop["pre"], levir_crop["post"], random_package, device="cpu", aoi=str(aoi), **names)
    assert not (tmp_path / "p.tif").exists()


def test_an_area_of_interest_reaching_beyond_the_grid_s_projection_is_cut_to_the_grid(tmp_path):
    """A world outline in degrees over a UTM grid: its far side, 90 degrees from the zone, has no UTM
    coordinates (pyproj gives infinity); only the grid's surroundings are placed on it."""
    grid = Grid(CRS.from_epsg(32614), Affine(0.5, 0, 630000, 0, -0.5, 3340000), 256, 256)
    world = write_layer(tmp_path / "world.gpkg", [[(-180, -89), (180, -89), (180, 89), (-180, 89), (-180, -89)]], 4326)
    assert area_of_interest(str(world), grid).crop(grid) == grid
    far = write_layer(tmp_path / "far.gpkg", [[(0, 0), (0, 1), (1, 1), (0, 0)]], 4326)
    with pytest.raises(RasterError, match="far.gpkg: the area of interest does not overlap the rasters"):
        area_of_interest(str(far), grid)
