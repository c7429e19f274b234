"""Local files that name remote sources: a VRT whose source is ``/vsicurl/https://...``, a WMS or STAC description.
GDAL would fetch from those servers as it reads, telling them who reads what and when; GeoChange reads local files
only, so such a file is refused before GDAL opens it.
"""
from __future__ import annotations

import functools
import os
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from geochange.engine.errors import RasterError

# GDAL's network file systems, and a URL's scheme (not vrt://, a local file's bands).
NETWORK_PATH = re.compile(r"/vsi(?:curl|s3|gs|az|adls|oss|swift|hdfs|webhdfs)|^(?!vrt://)[A-Za-z][A-Za-z0-9+.-]*://",
                          re.IGNORECASE)
# Connection names of GDAL's drivers that reach a server or a database (``PG:dbname=...``); a subdataset's
# (``NETCDF:"file.nc":sst``, ``GTIFF_DIR:1:file.tif``) is a local file's.
NETWORK_PREFIXES = {"PG", "MYSQL", "MSSQL", "OCI", "ODBC", "MONGODBV3", "HANA", "WFS", "OAPIF", "CSW", "WMS", "WCS",
                    "WMTS", "EEDA", "EEDAI", "DAAS", "NGW", "PLSCENES", "PLMOSAIC", "OGCAPI", "ES", "COUCHDB", "CARTO",
                    "AMIGOCLOUD", "GOOGLESHEETS"}
# GDAL 3.6's drivers whose files describe a server to read from.
NETWORK_DRIVERS = {"WMS", "WMTS", "WCS", "STACTA", "STACIT", "PLMosaic", "DAAS", "OGCAPI", "NGW", "EEDAI", "EEDA",
                   "WFS", "OAPIF", "CSW", "Elasticsearch", "CouchDB", "Carto", "AmigoCloud", "PLScenes", "HTTP"}
# Where a raster VRT (simple and warped), a pansharpened one and a vector VRT name their sources.
SOURCE_TAGS = {"SourceFilename", "SourceDataset", "SrcDataSource"}
NESTING = 8  # VRTs within VRTs checked, at most


def refuse_remote(path: str | os.PathLike) -> None:
    """``RasterError`` naming ``path`` if GDAL would read it from a server, itself or a source it names (VRTs within
    VRTs included). Checked once per version of the file (a trainer opens its rasters for every chip)."""
    status = os.stat(path)
    _refuse_remote(os.path.abspath(path), status.st_mtime_ns, status.st_size)


@functools.lru_cache(maxsize=256)
def _refuse_remote(path: str, mtime_ns: int, size: int) -> None:
    _check(Path(path), set(), 0)


def _check(path: Path, seen: set, depth: int) -> None:
    from osgeo import gdal

    if path in seen:
        return
    seen.add(path)
    driver = gdal.IdentifyDriverEx(str(path))
    name = driver.ShortName if driver is not None else None
    if name in NETWORK_DRIVERS:
        raise RasterError(f"{path}: a {name} description, read from a server; GeoChange reads local files only: save "
                          f"the data to a local file first (gdal_translate, ogr2ogr)")
    if name not in ("VRT", "OGR_VRT"):
        return
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError:  # GDAL's to refuse, as it reads it
        return
    for element in root.iter():
        if element.tag not in SOURCE_TAGS or not (element.text or "").strip():
            continue
        source = element.text.strip()
        prefix = re.match(r"([A-Za-z][A-Za-z0-9_]+):", source)
        if NETWORK_PATH.search(source) or (prefix and prefix.group(1).upper() in NETWORK_PREFIXES):
            raise RasterError(f"{path}: names a remote source, {source}; GeoChange reads local files only: save the "
                              f"data to a local file first (gdal_translate, ogr2ogr)")
        local = Path(source[len("vrt://"):].split("?")[0] if source.lower().startswith("vrt://") else source)
        if element.get("relativeToVRT", "0").strip() == "1":
            local = path.parent / local
        if local.is_file() and _text(local):  # a VRT or a service description (XML, JSON) under any name
            if depth >= NESTING:
                raise RasterError(f"{path}: VRTs nested more than {NESTING} deep")
            _check(local, seen, depth + 1)


def _text(path: Path) -> bool:
    """Whether ``path`` opens as XML or JSON, as VRTs and service descriptions do (not a GeoTIFF's bytes): a mosaic's
    thousands of sources are not identified one by one."""
    with open(path, "rb") as f:
        return f.read(64).lstrip()[:1] in (b"<", b"{")
