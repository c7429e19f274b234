"""Change polygons from a mask and a probability raster, with areas in square metres."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pyproj import CRS, Geod, Transformer
from rasterio.features import shapes
import shapely
from shapely.geometry import shape
from shapely.geometry.polygon import orient
from skimage.measure import label as label_components

from geochange.engine.atomic import atomic_path

_GEOD = Geod(ellps="WGS84")
# Output driver by file extension.
DRIVERS = {".gpkg": "GPKG", ".geojson": "GeoJSON", ".json": "GeoJSON"}


@dataclass
class ChangePolygon:
    geometry: object  # shapely Polygon in the raster's CRS
    area_m2: float
    mean_prob: float
    max_prob: float


def geodesic_area(geometry, crs) -> float:
    """Area on the WGS84 ellipsoid in m2, whatever the CRS (projected areas are distorted)."""
    crs = CRS.from_user_input(crs)
    if crs.to_epsg() != 4326:
        to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
        geometry = shapely.transform(geometry, to_lonlat.transform, interleaved=False)
    # Geod signs each ring by its orientation: exterior counter-clockwise, holes clockwise.
    return abs(_GEOD.geometry_area_perimeter(orient(geometry, sign=1.0))[0])


def change_polygons(mask: np.ndarray, probability: np.ndarray, transform, crs, *, min_area_m2: float = 0.0,
                    simplify: float = 0.0) -> list[ChangePolygon]:
    """One polygon per 4-connected changed region (holes kept), simplified preserving topology.

    ``min_area_m2`` drops regions whose final area is smaller; ``simplify`` is a tolerance in map units.
    """
    components = label_components(mask.astype(bool), connectivity=1).astype(np.int32)
    count = int(components.max())
    if count == 0:
        return []
    flat = components.ravel()
    probs = np.nan_to_num(probability.ravel().astype(np.float64))
    pixels = np.bincount(flat, minlength=count + 1)
    means = np.bincount(flat, weights=probs, minlength=count + 1) / np.maximum(pixels, 1)
    maxima = np.zeros(count + 1)
    np.maximum.at(maxima, flat, probs)
    polygons = []
    for geom, value in shapes(components, mask=components > 0, connectivity=4, transform=transform):
        polygon = shape(geom)
        if simplify > 0:
            polygon = polygon.simplify(simplify, preserve_topology=True)
        area = geodesic_area(polygon, crs)
        if area >= min_area_m2 and not polygon.is_empty:
            i = int(value)
            polygons.append(ChangePolygon(polygon, area, float(means[i]), float(maxima[i])))
    return polygons


def write_polygons(polygons: list[ChangePolygon], path: str | os.PathLike, crs, *, layer: str = "changes",
                   extra: dict | None = None) -> Path:
    """Write polygons with ``id, area_m2, mean_prob, max_prob`` (+ ``extra`` string fields) atomically."""
    from osgeo import ogr, osr

    path = Path(path)
    driver_name = DRIVERS.get(path.suffix.lower())
    if driver_name is None:
        raise ValueError(f"{path}: unsupported vector format; use one of {', '.join(DRIVERS)}")
    srs = osr.SpatialReference()
    srs.ImportFromWkt(CRS.from_user_input(crs).to_wkt())
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    extra = extra or {}
    with atomic_path(path) as tmp:
        ds = ogr.GetDriverByName(driver_name).CreateDataSource(str(tmp))
        if ds is None:
            raise OSError(f"{path}: GDAL cannot create a {driver_name} file here")
        lyr = ds.CreateLayer(layer, srs, ogr.wkbMultiPolygon)
        lyr.CreateField(ogr.FieldDefn("id", ogr.OFTInteger64))
        for name in ("area_m2", "mean_prob", "max_prob"):
            lyr.CreateField(ogr.FieldDefn(name, ogr.OFTReal))
        for name in extra:
            lyr.CreateField(ogr.FieldDefn(name, ogr.OFTString))
        defn = lyr.GetLayerDefn()
        lyr.StartTransaction()
        for i, p in enumerate(polygons, start=1):
            feature = ogr.Feature(defn)
            feature.SetField("id", i)
            feature.SetField("area_m2", p.area_m2)
            feature.SetField("mean_prob", p.mean_prob)
            feature.SetField("max_prob", p.max_prob)
            for name, value in extra.items():
                feature.SetField(name, str(value))
            feature.SetGeometry(ogr.ForceToMultiPolygon(ogr.CreateGeometryFromWkb(p.geometry.wkb)))
            lyr.CreateFeature(feature)
        lyr.CommitTransaction()
        ds = None  # closes and flushes the file before the rename
    return path
