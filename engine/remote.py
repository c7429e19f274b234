"""Local files that name remote sources: a VRT whose source is ``/vsicurl/https://...``, a WMS or STAC description.
GDAL would fetch from those servers as it reads, telling them who reads what and when; GeoChange reads local files
only, so such a file is refused before GDAL opens it.
"""
from __future__ import annotations

import html
import re
from pathlib import Path

from geochange.engine.errors import RasterError

# A URL, a network file system of GDAL's, or a driver's connection name (PG:, WFS:, EEDAI: ...; not C:\).
REMOTE = re.compile(r"://|/vsi(?:curl|s3|gs|az|adls|oss|swift|hdfs|webhdfs)|^[A-Za-z][A-Za-z0-9_]+:", re.IGNORECASE)
# GDAL 3.6's drivers whose files describe a server to read from.
NETWORK_DRIVERS = {"WMS", "WMTS", "WCS", "STACTA", "STACIT", "PLMosaic", "DAAS", "OGCAPI", "NGW", "EEDAI", "EEDA",
                   "WFS", "OAPIF", "CSW", "Elasticsearch", "CouchDB", "Carto", "AmigoCloud", "PLScenes", "HTTP"}
# The sources a raster or vector VRT names, and whether they are relative to it.
VRT_SOURCES = re.compile(r"<(SourceFilename|SrcDataSource)\b([^>]*)>([^<]*)</\1>")
NESTING = 8  # VRTs within VRTs checked, at most


def refuse_remote(path: str | Path, depth: int = 0) -> None:
    """``RasterError`` naming ``path`` if GDAL would read it from a server, itself or a source it names (VRTs within
    VRTs included)."""
    from osgeo import gdal

    driver = gdal.IdentifyDriverEx(str(path))
    name = driver.ShortName if driver is not None else None
    if name in NETWORK_DRIVERS:
        raise RasterError(f"{path}: a {name} description, read from a server; GeoChange reads local files only: save "
                          f"the data to a local file first (gdal_translate, ogr2ogr)")
    if name not in ("VRT", "OGR_VRT"):
        return
    for _, attributes, text in VRT_SOURCES.findall(Path(path).read_text(errors="replace")):
        source = html.unescape(text.strip())
        if REMOTE.search(source):
            raise RasterError(f"{path}: names a remote source, {source}; GeoChange reads local files only: save the "
                              f"data to a local file first (gdal_translate, ogr2ogr)")
        nested = Path(path).parent / source if 'relativeToVRT="1"' in attributes.replace("'", '"') else Path(source)
        if nested.suffix.lower() == ".vrt" and nested.is_file():
            if depth >= NESTING:
                raise RasterError(f"{path}: VRTs nested more than {NESTING} deep")
            refuse_remote(nested, depth + 1)
