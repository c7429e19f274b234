"""Processing algorithm ``geochange:assessaccuracy``: a change map against the analyst's reference."""
from __future__ import annotations

from qgis.core import (
    QgsMapLayerType,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterMapLayer,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingUtils,
)

from geochange.engine.contracts import OBJECT_IOU, VECTOR_FORMATS
from geochange.qgis_plugin import styles
from geochange.qgis_plugin.engine_algorithm import GEOTIFF, EngineAlgorithm, raster_file, tr
from geochange.qgis_plugin.evaluate_algorithm import COUNTS, METRICS
from geochange.qgis_plugin.parameters import option_parameter, option_value, vector_source
from geochange.qgis_plugin.tables import TABLE_FILTER, TABLE_SUFFIXES, write_table

FIGURES = {**{key: METRICS[key] for key in ("precision", "recall", "f1", "iou", "oa")},
           "kappa": "Cohen's kappa: agreement beyond chance"}
OBJECTS = {"reference": "reference objects", "found": "reference objects found", "missed": "reference objects missed",
           "predicted": "predicted objects", "true": "predicted objects matching a reference object",
           "false": "predicted objects matching none"}
# As Evaluate a model names them (evaluate_algorithm.NUMERIC_OUTPUTS), with kappa.
NUMERIC_OUTPUTS = {"F1": "f1", "IOU": "iou", "KAPPA": "kappa", "PRECISION_SCORE": "precision", "RECALL": "recall",
                   "OA": "oa"}
LAYER_TYPES = [QgsProcessing.TypeRaster, QgsProcessing.TypeVectorPolygon]


class AssessAccuracyAlgorithm(EngineAlgorithm):
    NAME = "assessaccuracy"
    DISPLAY_NAME = "Assess change accuracy"
    GROUP = "detection"
    SUMMARY = ("<p>Compares a change map with the analyst's reference: pixel figures (confusion counts, "
               "change-class precision, recall, F1, IoU, Cohen's kappa, overall accuracy) and object counts "
               "(4-connected regions of change found or missed, predicted objects true or false).</p><p>The "
               "comparison is made on the prediction's grid when it is a raster, else on the reference "
               "raster's; polygons are burnt in at pixel centres, and a raster on another grid or CRS is "
               "reprojected (nearest neighbour). One of the two must be a raster. Pixels outside the area of "
               "interest, nodata in either map, or equal to the ignore value in the reference count in no "
               "figure.</p>")
    PARAMETER_HELP = {
        "PREDICTION": "The change map: the <i>Change mask</i> of <i>Detect changes</i> (255 change, 0 no change, "
                      "127 nodata; a 0/1 mask too) or change polygons (inside = change).",
        "REFERENCE": "The reference: a raster (0 = no change, 1 or 255 = change) on any grid, or polygons "
                     "(inside = change). Layers must be files.",
        "AOI": "Polygons (any polygon layer, in any CRS) outside which no pixel is assessed and no object "
               "counted. Empty: everywhere.",
        "IGNORE_VALUE": "Reference raster value of unlabelled pixels, which count in no figure (e.g. 255 beside "
                        "0 = no change, 1 = change). Empty: every pixel is labelled but those of the reference "
                        "file's own nodata value.",
        "OBJECT_IOU": "Intersection over union at which a predicted object and a reference object match; 0.5, "
                      "as object detection counts, makes every match one-to-one.",
        "OUTPUT": "The table of figures (metric, meaning, value): HTML (shown in the results viewer) or CSV, "
                  "chosen by the file extension.",
        "OUTPUT_RASTER": "Each assessed pixel's agreement: true positive (green), false positive (red), false "
                         "negative (blue), true negative (transparent); 255 where nothing was assessed.",
        **{name: f"The {FIGURES[key]}." for name, key in NUMERIC_OUTPUTS.items()},
    }
    FLAGS = {"--ignore-value": "IGNORE_VALUE", "--object-iou": "OBJECT_IOU", "--aoi": "AOI"}

    def tags(self):
        return tr("accuracy,assess,reference,validation,confusion,kappa,f1,iou,objects").split(",")

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS's name)
        self.addParameter(QgsProcessingParameterMapLayer("PREDICTION", tr("Change mask or polygons"),
                                                         types=LAYER_TYPES))
        self.addParameter(QgsProcessingParameterMapLayer("REFERENCE", tr("Reference raster or polygons"),
                                                         types=LAYER_TYPES))
        self.addParameter(option_parameter("aoi"))
        self.addParameter(QgsProcessingParameterNumber("IGNORE_VALUE", tr("Reference value of unlabelled pixels"),
                                                       QgsProcessingParameterNumber.Double, optional=True))
        self.addParameter(QgsProcessingParameterNumber("OBJECT_IOU", tr("Object match IoU"),
                                                       QgsProcessingParameterNumber.Double, defaultValue=OBJECT_IOU,
                                                       minValue=0.01, maxValue=1.0))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", tr("Accuracy table"),
                                                                fileFilter=tr(TABLE_FILTER)))
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT_RASTER", tr("TP/FP/FN raster")))
        for name, key in NUMERIC_OUTPUTS.items():
            self.addOutput(QgsProcessingOutputNumber(name, tr(FIGURES[key].capitalize())))

    def layer_source(self, parameters, name, context) -> str:
        """The file the engine reads behind a raster or polygon layer (``FILE|layername=NAME`` for a layer of a
        GeoPackage). Polygons as the layer shows them: a filtered, memory or database layer is written to a file
        first (the engine would read every feature of the file)."""
        layer = self.parameterAsLayer(parameters, name, context)
        if layer is None:
            raise QgsProcessingException(tr("{}: no such layer or file").format(name))
        if layer.type() == QgsMapLayerType.VectorLayer:
            # A feedback object is needed: QGIS 3.22 crashes exporting a layer without one.
            return vector_source(*QgsProcessingUtils.convertToCompatibleFormatAndLayerName(
                layer, False, name, list(VECTOR_FORMATS), "gpkg", context, QgsProcessingFeedback()), layer)
        return raster_file(layer, name)

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        prediction = self.layer_source(parameters, "PREDICTION", context)
        reference = self.layer_source(parameters, "REFERENCE", context)
        table = self.output_path(parameters, "OUTPUT", context, TABLE_SUFFIXES)
        raster = self.output_path(parameters, "OUTPUT_RASTER", context, GEOTIFF)
        args = {"prediction": prediction, "reference": reference,
                "aoi": option_value(self, parameters, context, "aoi"),
                "ignore_value": self.optional_double(parameters, "IGNORE_VALUE", context),
                "object_iou": self.parameterAsDouble(parameters, "OBJECT_IOU", context), "out_raster": raster}
        summary = self.run_engine("assess", args, feedback, [raster])
        objects = summary["objects"]
        rows = [[key, tr(meaning), summary["global"][key]] for key, meaning in FIGURES.items()]
        rows += [[key, tr(meaning), summary["confusion"][key]] for key, meaning in COUNTS.items()]
        rows += [["pixels", tr("pixels assessed"), summary["pixels_assessed"]]]
        rows += [[f"objects.{key}", tr(meaning), objects[key]] for key, meaning in OBJECTS.items()]
        notes = [tr("prediction {}, reference {}; objects match at IoU >= {:g}").format(
            prediction, reference, objects["iou_threshold"])]
        write_table(table, tr("GeoChange accuracy assessment"), [tr("metric"), tr("meaning"), tr("value")], rows,
                    notes)
        feedback.pushInfo(tr("F1 {:.4f}, IoU {:.4f}, kappa {:.4f}; {} of {} reference objects found").format(
            summary["global"]["f1"], summary["global"]["iou"], summary["global"]["kappa"], objects["found"],
            objects["reference"]))
        styles.style_outputs(context, feedback, [(raster, tr("{}: TP/FP/FN").format(
            self.parameterAsLayer(parameters, "PREDICTION", context).name()), styles.style_agreement)])
        return {"OUTPUT": table, "OUTPUT_RASTER": raster,
                **{name: summary["global"][key] for name, key in NUMERIC_OUTPUTS.items()}}
