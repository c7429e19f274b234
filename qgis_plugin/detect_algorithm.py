"""Processing algorithm ``geochange:detectchanges``: run a model package on a raster pair.

Only QGIS is imported at module level; torch and the engine are imported when the algorithm runs,
so that loading the plugin (at every QGIS start) stays cheap and works without torch installed.
"""
from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProviderRegistry,
)
from qgis.PyQt.QtCore import QCoreApplication

HELP = """<p>Compares a raster taken before and a raster taken after an event with a change-detection
network and writes where the scene changed.</p>
<p>Both rasters must lie on one grid (same CRS, pixel size, extent and size): resample the post
raster onto the pre raster first when they differ (e.g. with GDAL's Warp). The network runs on
overlapping tiles whose seams are blended, so rasters of any size can be processed.</p>
<h3>Parameters</h3>
<dl>
<dt>Pre-change raster</dt><dd>The earlier image; the outputs take its grid and CRS. Its bands must
be those the model expects (they are listed in the model package). Nodata pixels are skipped.</dd>
<dt>Post-change raster</dt><dd>The later image, on the pre raster's grid.</dd>
<dt>Model package</dt><dd>A GeoChange model file (<code>.safetensors</code>). It holds the weights,
the architecture and how inputs are scaled. Pickled PyTorch checkpoints (<code>.pth</code>) are
refused: convert them with <code>geochange import-weights</code>.</dd>
<dt>Device</dt><dd><code>auto</code> (a GPU when one is usable, else the CPU), <code>cpu</code>,
<code>cuda</code> or a given GPU such as <code>cuda:0</code>.</dd>
<dt>Tile size</dt><dd>Side in pixels of the square windows given to the network.</dd>
<dt>Tile overlap</dt><dd>Pixels shared by neighbouring windows; their predictions are blended so
that no seams appear.</dd>
<dt>Batch size</dt><dd>Windows run together; lower it if memory runs out.</dd>
<dt>Change threshold</dt><dd>Probability from which a pixel counts as changed. Leave it empty to use the
threshold stored in the model package (usually 0.5).</dd>
<dt>Minimum polygon area</dt><dd>Change polygons smaller than this (square metres) are dropped.</dd>
<dt>Simplify tolerance</dt><dd>Polygon outlines are simplified with this tolerance, in the units of
the pre raster's CRS; 0 keeps the pixel outlines.</dd>
</dl>
<h3>Outputs</h3>
<dl>
<dt>Change probability</dt><dd>GeoTIFF, float 0..1 per pixel; -1 (nodata) where an input has
no data.</dd>
<dt>Change mask</dt><dd>GeoTIFF, 255 = changed, 0 = unchanged, 127 = nodata.</dd>
<dt>Change polygons</dt><dd>GeoPackage of the changed areas with their area in square metres
(<code>area_m2</code>) and the mean and maximum change probability inside them
(<code>mean_prob</code>, <code>max_prob</code>).</dd>
</dl>
<p>Nothing is written under the output names if the run fails or is cancelled.</p>
"""


def _tr(text: str) -> str:
    return QCoreApplication.translate("GeoChange", text)


class DetectChangesAlgorithm(QgsProcessingAlgorithm):
    PRE = "PRE"
    POST = "POST"
    MODEL = "MODEL"
    DEVICE = "DEVICE"
    TILE_SIZE = "TILE_SIZE"
    OVERLAP = "OVERLAP"
    BATCH_SIZE = "BATCH_SIZE"
    THRESHOLD = "THRESHOLD"
    MIN_AREA = "MIN_AREA"
    SIMPLIFY = "SIMPLIFY"
    OUTPUT_PROBABILITY = "OUTPUT_PROBABILITY"
    OUTPUT_MASK = "OUTPUT_MASK"
    OUTPUT_POLYGONS = "OUTPUT_POLYGONS"
    POLYGON_COUNT = "POLYGON_COUNT"
    CHANGED_AREA_M2 = "CHANGED_AREA_M2"

    def name(self):
        return "detectchanges"

    def displayName(self):  # noqa: N802 (QGIS's name)
        return _tr("Detect changes")

    def tags(self):
        return _tr("change,detection,deep learning,difference,bitemporal,pytorch").split(",")

    def shortHelpString(self):  # noqa: N802 (QGIS's name)
        return _tr(HELP)

    def createInstance(self):  # noqa: N802 (QGIS's name)
        return DetectChangesAlgorithm()

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS's name)
        self.addParameter(QgsProcessingParameterRasterLayer(self.PRE, _tr("Pre-change raster")))
        self.addParameter(QgsProcessingParameterRasterLayer(self.POST, _tr("Post-change raster")))
        # "All files" keeps other names acceptable, so that a wrong file (a .pth checkpoint...) gets
        # the engine's explanation instead of QGIS's bare "Incorrect parameter value".
        self.addParameter(QgsProcessingParameterFile(
            self.MODEL, _tr("Model package"), behavior=QgsProcessingParameterFile.File,
            fileFilter=_tr("GeoChange model package (*.safetensors);;All files (*)")))
        # A free string rather than an enum: the GPU index (cuda:1, ...) depends on the machine.
        self.addParameter(QgsProcessingParameterString(self.DEVICE, _tr("Device (auto, cpu, cuda, cuda:N)"),
                                                       defaultValue="auto"))
        self.addParameter(self._integer(self.TILE_SIZE, _tr("Tile size (pixels)"), 512, minimum=32))
        self.addParameter(self._integer(self.OVERLAP, _tr("Tile overlap (pixels)"), 64, minimum=0))
        self.addParameter(self._integer(self.BATCH_SIZE, _tr("Batch size (tiles)"), 4, minimum=1))
        self.addParameter(QgsProcessingParameterNumber(
            self.THRESHOLD, _tr("Change threshold (empty = the model's)"),
            QgsProcessingParameterNumber.Double, optional=True, minValue=0.0, maxValue=1.0))
        self.addParameter(QgsProcessingParameterNumber(
            self.MIN_AREA, _tr("Minimum polygon area (m²)"), QgsProcessingParameterNumber.Double,
            defaultValue=0.0, minValue=0.0))
        self.addParameter(QgsProcessingParameterNumber(
            self.SIMPLIFY, _tr("Simplify tolerance (map units)"), QgsProcessingParameterNumber.Double,
            defaultValue=0.0, minValue=0.0))
        self.addParameter(QgsProcessingParameterRasterDestination(
            self.OUTPUT_PROBABILITY, _tr("Change probability")))
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT_MASK, _tr("Change mask")))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT_POLYGONS, _tr("Change polygons"), QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber(self.POLYGON_COUNT, _tr("Number of change polygons")))
        self.addOutput(QgsProcessingOutputNumber(self.CHANGED_AREA_M2, _tr("Changed area (m²)")))

    @staticmethod
    def _integer(name, description, default, minimum):
        return QgsProcessingParameterNumber(name, description, QgsProcessingParameterNumber.Integer,
                                            defaultValue=default, minValue=minimum)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        feedback = feedback or QgsProcessingFeedback()
        pre = self._raster_path(parameters, self.PRE, context)
        post = self._raster_path(parameters, self.POST, context)
        probability = self._output_path(parameters, self.OUTPUT_PROBABILITY, context, (".tif", ".tiff"))
        mask = self._output_path(parameters, self.OUTPUT_MASK, context, (".tif", ".tiff"))
        polygons = self._output_path(parameters, self.OUTPUT_POLYGONS, context, (".gpkg",))
        threshold = (None if parameters.get(self.THRESHOLD) in (None, "")
                     else self.parameterAsDouble(parameters, self.THRESHOLD, context))

        from geochange.qgis_plugin.host_libraries import import_shapely_with_its_own_geos

        try:
            import_shapely_with_its_own_geos()
            from geochange.engine.errors import GeoChangeError
            from geochange.engine.inference import detect
            from geochange.qgis_plugin.feedback_progress import FeedbackProgress
        except ImportError as e:
            raise QgsProcessingException(
                _tr("GeoChange cannot run: a Python dependency is missing from QGIS's Python "
                    "({}). Install PyTorch and GeoChange's requirements for the Python QGIS uses.")
                .format(e)) from e

        try:
            result = detect(
                pre, post, self.parameterAsFile(parameters, self.MODEL, context),
                probability=probability, mask=mask, polygons=polygons,
                tile=self.parameterAsInt(parameters, self.TILE_SIZE, context),
                overlap=self.parameterAsInt(parameters, self.OVERLAP, context),
                batch=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
                device=self.parameterAsString(parameters, self.DEVICE, context).strip() or "auto",
                threshold=threshold,
                min_area=self.parameterAsDouble(parameters, self.MIN_AREA, context),
                simplify=self.parameterAsDouble(parameters, self.SIMPLIFY, context),
                progress=FeedbackProgress(feedback))
        except GeoChangeError as e:
            raise QgsProcessingException(str(e)) from e

        feedback.pushInfo(_tr("{} change polygons, {:.1f} m² changed").format(
            result.polygon_count, result.changed_area_m2))
        return {
            self.OUTPUT_PROBABILITY: str(result.probability),
            self.OUTPUT_MASK: str(result.mask),
            self.OUTPUT_POLYGONS: str(result.polygons),
            self.POLYGON_COUNT: result.polygon_count,
            self.CHANGED_AREA_M2: result.changed_area_m2,
        }

    def _raster_path(self, parameters, name, context) -> str:
        """The file behind a raster layer parameter; the engine reads files through GDAL itself."""
        layer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None:
            raise QgsProcessingException(self.invalidRasterError(parameters, name))
        if layer.providerType() != "gdal":
            raise QgsProcessingException(_tr("{}: '{}' is a {} layer; GeoChange reads raster files only")
                                         .format(name, layer.name(), layer.providerType()))
        return QgsProviderRegistry.instance().decodeUri("gdal", layer.source())["path"]

    def _output_path(self, parameters, name, context, suffixes) -> str:
        path = self.parameterAsOutputLayer(parameters, name, context)
        if Path(path).suffix.lower() not in suffixes:
            raise QgsProcessingException(_tr("{}: '{}' must end in {} (the format GeoChange writes)")
                                         .format(name, path, " or ".join(suffixes)))
        return path
