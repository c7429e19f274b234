"""Processing algorithm ``geochange:vectorizechanges``: polygons from an existing probability raster."""
from __future__ import annotations

from qgis.core import (
    QgsProcessing,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBand,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorDestination,
)

from geochange.qgis_plugin import styles
from geochange.qgis_plugin.engine_algorithm import EngineAlgorithm, tr
from geochange.qgis_plugin.parameters import (ENGINE_NOTES, POLYGON_OUTPUTS_HELP, option_help, option_parameter,
                                              option_value)


class VectorizeChangesAlgorithm(EngineAlgorithm):
    NAME = "vectorizechanges"
    DISPLAY_NAME = "Vectorise change probability"
    GROUP = "detection"
    SUMMARY = ("<p>Turns a change-probability raster (the <i>Change probability</i> output of <i>Detect "
               "changes</i>, or any raster of probabilities in 0..1) into change polygons with a new threshold, "
               "minimum area and simplification, without running the model again.</p><p>A pixel is changed "
               "when its probability is strictly above the threshold; nodata and NaN pixels never are. Each "
               "4-connected changed region becomes one polygon (holes kept), as <i>Detect changes</i> writes "
               "them.</p>")
    PARAMETER_HELP = {
        **option_help(["min_area", "simplify"]),
        **POLYGON_OUTPUTS_HELP,
        "INPUT": "The change-probability raster. With a CRS, areas are computed on the ellipsoid; without one (the "
                 "outputs of a pair of plain images), in pixels, as are the minimum area and the tolerance.",
        "BAND": "The band holding the probabilities (empty: band 1).",
        "THRESHOLD": "Probability above which a pixel counts as changed.",
        "OUTPUT": "GeoPackage (or shapefile, GeoJSON) of the changed areas with <code>area_m2</code> "
                  "(<code>area_px</code> for a raster without a CRS), <code>mean_prob</code> and "
                  "<code>max_prob</code>. Loaded as outlines labelled with their area.",
    }
    NOTES = ENGINE_NOTES

    def tags(self):
        return tr("change,threshold,polygonize,vectorize,probability").split(",")

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS's name)
        self.addParameter(QgsProcessingParameterRasterLayer("INPUT", tr("Change probability raster")))
        # Optional: QGIS 3.22 refuses a missing non-optional band parameter even when it has a default.
        self.addParameter(QgsProcessingParameterBand("BAND", tr("Probability band"), defaultValue=1,
                                                     parentLayerParameterName="INPUT", optional=True))
        self.addParameter(option_parameter("threshold", default=0.5, label="Change threshold"))  # no model here
        for name in ("min_area", "simplify"):
            self.addParameter(option_parameter(name))
        self.addParameter(QgsProcessingParameterVectorDestination("OUTPUT", tr("Change polygons"),
                                                                  QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber("POLYGON_COUNT", tr("Number of change polygons")))
        self.addOutput(QgsProcessingOutputNumber("CHANGED_AREA_M2", tr("Changed area (m²)")))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        polygons, polygon_layer, polygons_uri = self.polygon_output(parameters, "OUTPUT", context)
        threshold = self.parameterAsDouble(parameters, "THRESHOLD", context)
        args = {"probability": self.raster_path(parameters, "INPUT", context), "polygons": polygons,
                "polygon_layer": polygon_layer, "band": self.parameterAsInt(parameters, "BAND", context) or 1,
                "threshold": threshold,
                **{name: option_value(self, parameters, context, name) for name in ("min_area", "simplify")}}
        result = self.run_engine("vectorize", args, feedback, [polygons])
        feedback.pushInfo(tr("{} change polygons, {:.1f} {} changed").format(
            result["polygon_count"], result["changed_area_m2"], result["area_unit"]))
        name = tr("{}: change polygons (p > {:g})").format(self.layer_name(parameters, "INPUT", context), threshold)
        styles.style_outputs(context, feedback, [(polygons_uri, name, styles.style_polygons)])
        return {"OUTPUT": polygons_uri, "POLYGON_COUNT": result["polygon_count"],
                "CHANGED_AREA_M2": result["changed_area_m2"]}
