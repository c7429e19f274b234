"""Local files that name remote sources (a VRT's /vsicurl/ source, a WMS description) are refused before GDAL opens
them: GDAL would fetch from the server as it reads, telling it who reads what and when."""
import http.server
import threading

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from geochange.engine.aoi import read_polygons
from geochange.engine.errors import RasterError
from geochange.engine.rasters import read_image


@pytest.fixture
def server(tmp_path):
    """A local HTTP server whose requests are counted; ``url``: its address."""
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            hits.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}", "hits": hits}
    httpd.shutdown()


def raster_vrt(path, source: str, relative: bool = False):
    bands = "".join(f'<VRTRasterBand dataType="Byte" band="{b}"><SimpleSource><SourceFilename relativeToVRT='
                    f'"{int(relative)}">{source}</SourceFilename><SourceBand>{b}</SourceBand></SimpleSource>'
                    f'</VRTRasterBand>' for b in (1, 2, 3))
    path.write_text(f'<VRTDataset rasterXSize="32" rasterYSize="32"><SRS>EPSG:32631</SRS>'
                    f'<GeoTransform>500000,1,0,5000000,0,-1</GeoTransform>{bands}</VRTDataset>')
    return path


def test_rasters_and_polygons_naming_a_server_are_refused_before_anything_is_fetched(server, tmp_path):
    image = np.arange(3 * 32 * 32, dtype=np.uint8).reshape(3, 32, 32)
    with rasterio.open(tmp_path / "x.tif", "w", driver="GTiff", width=32, height=32, count=3, dtype="uint8",
                       crs="EPSG:32631", transform=from_origin(500000, 5000000, 1, 1)) as dst:
        dst.write(image)
    remote = raster_vrt(tmp_path / "remote.vrt", f"/vsicurl/{server['url']}/x.tif")
    with pytest.raises(RasterError, match=r"remote.vrt: names a remote source, /vsicurl/http://127\.0\.0\.1"):
        read_image(remote)
    # Within another VRT, and as a WMS description.
    outer = raster_vrt(tmp_path / "outer.vrt", "remote.vrt", relative=True)
    with pytest.raises(RasterError, match="remote.vrt: names a remote source"):
        read_image(outer)
    wms = tmp_path / "service.xml"
    wms.write_text(f'<GDAL_WMS><Service name="TMS"><ServerUrl>{server["url"]}/${{z}}/${{x}}/${{y}}.png</ServerUrl>'
                   '</Service><DataWindow><UpperLeftX>-20037508.34</UpperLeftX><UpperLeftY>20037508.34</UpperLeftY>'
                   '<LowerRightX>20037508.34</LowerRightX><LowerRightY>-20037508.34</LowerRightY><TileLevel>18'
                   '</TileLevel><TileCountX>1</TileCountX><TileCountY>1</TileCountY></DataWindow></GDAL_WMS>')
    with pytest.raises(RasterError, match="service.xml: a WMS description, read from a server"):
        read_image(wms)
    # An area of interest as an OGR VRT over a GeoJSON on the server.
    (tmp_path / "aoi.geojson").write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", '
                                          '"properties": {}, "geometry": {"type": "Polygon", "coordinates": '
                                          '[[[0, 0], [1, 0], [1, 1], [0, 0]]]}}]}')
    aoi = tmp_path / "aoi.vrt"
    aoi.write_text(f'<OGRVRTDataSource><OGRVRTLayer name="aoi"><SrcDataSource>/vsicurl/{server["url"]}/aoi.geojson'
                   '</SrcDataSource></OGRVRTLayer></OGRVRTDataSource>')
    with pytest.raises(RasterError, match="aoi.vrt: names a remote source"):
        read_polygons(str(aoi))
    # gdalwarp's VRT (its source a SourceDataset), a source in CDATA, a nested VRT not named .vrt.
    from osgeo import gdal

    gdal.Warp(str(tmp_path / "warped.vrt"), str(tmp_path / "x.tif"), format="VRT", dstSRS="EPSG:4326")
    warped = (tmp_path / "warped.vrt").read_text()
    (tmp_path / "warped.vrt").write_text(warped.replace(str(tmp_path / "x.tif"), f"/vsicurl/{server['url']}/x.tif")
                                         .replace(">x.tif<", f">/vsicurl/{server['url']}/x.tif<"))
    cdata = raster_vrt(tmp_path / "cdata.vrt", f"<![CDATA[/vsicurl/{server['url']}/x.tif]]>")
    raster_vrt(tmp_path / "inner.xml", f"/vsicurl/{server['url']}/x.tif")
    for vrt, named in ((tmp_path / "warped.vrt", "warped.vrt"), (cdata, "cdata.vrt"),
                       (raster_vrt(tmp_path / "outer.xml.vrt", "inner.xml", relative=True), "inner.xml")):
        with pytest.raises(RasterError, match=f"{named}: names a remote source, /vsicurl/"):
            read_image(vrt)
    assert server["hits"] == []
    # VRTs of local files are read as before: by name, relative to the VRT, as GDAL's vrt:// and subdataset names.
    local = raster_vrt(tmp_path / "local.vrt", "x.tif", relative=True)
    assert np.array_equal(read_image(local), image)
    assert np.array_equal(read_image(raster_vrt(tmp_path / "outer_local.vrt", "local.vrt", relative=True)), image)
    for source in (f"vrt://{tmp_path / 'x.tif'}", f"GTIFF_DIR:1:{tmp_path / 'x.tif'}"):
        assert np.array_equal(read_image(raster_vrt(tmp_path / "named.vrt", source)), image)
