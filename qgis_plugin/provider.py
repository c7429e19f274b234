"""The Processing provider ``geochange``: the group "GeoChange" in the toolbox."""
from __future__ import annotations

from qgis.core import QgsProcessingProvider

from geochange.qgis_plugin.detect_algorithm import DetectChangesAlgorithm


class GeoChangeProvider(QgsProcessingProvider):
    def id(self):
        return "geochange"

    def name(self):
        return "GeoChange"

    def longName(self):  # noqa: N802 (QGIS's name)
        return "GeoChange change detection"

    def loadAlgorithms(self):  # noqa: N802 (QGIS's name)
        self.addAlgorithm(DetectChangesAlgorithm())

    # The engine writes GeoTIFF rasters and GeoPackage vectors only; offering other formats in
    # the output widgets would produce files with the wrong content for their extension.
    def supportedOutputRasterLayerExtensions(self):  # noqa: N802 (QGIS's name)
        return ["tif"]

    def defaultRasterFileExtension(self):  # noqa: N802 (QGIS's name)
        return "tif"

    def supportedOutputVectorLayerExtensions(self):  # noqa: N802 (QGIS's name)
        return ["gpkg"]

    def defaultVectorFileExtension(self, hasGeometry=True):  # noqa: N802,N803 (QGIS's names)
        return "gpkg"
