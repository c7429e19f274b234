"""Processing algorithm ``geochange:evaluatemodel``: metrics of a package on a folder dataset."""
from __future__ import annotations

from pathlib import Path

from qgis.core import (
    QgsProcessingOutputNumber,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
)

from geochange.engine.options import EVALUATE, names
from geochange.qgis_plugin.engine_algorithm import EngineAlgorithm, tr
from geochange.qgis_plugin.parameters import (ENGINE_NOTES, MODEL_HELP, add_options, chosen_model, model_parameters,
                                              option_help, option_values)
from geochange.qgis_plugin.tables import TABLE_FILTER, TABLE_SUFFIXES, write_table

# The engine's metric names (engine.metrics.METRIC_NAMES) with what they mean.
METRICS = {
    "precision": "change-class precision", "recall": "change-class recall", "f1": "change-class F1",
    "iou": "change-class IoU", "oa": "overall accuracy", "mIoU": "mean IoU of both classes",
    "mF1": "mean F1 of both classes", "mPrecision": "mean precision of both classes",
    "mAcc": "mean recall of both classes",
}
# Pixel counts of the summed confusion matrix.
COUNTS = {"tp": "changed pixels predicted changed", "fp": "unchanged pixels predicted changed",
          "fn": "changed pixels predicted unchanged", "tn": "unchanged pixels predicted unchanged"}
# Global metrics also given as numeric outputs (usable by later steps of a model); the precision's named apart from
# the parameter PRECISION, the arithmetic's.
NUMERIC_OUTPUTS = {"F1": "f1", "IOU": "iou", "PRECISION_SCORE": "precision", "RECALL": "recall", "OA": "oa"}


class EvaluateModelAlgorithm(EngineAlgorithm):
    NAME = "evaluatemodel"
    DISPLAY_NAME = "Evaluate a model"
    GROUP = "models"
    SUMMARY = ("<p>Runs a model package on every image pair of a folder dataset and compares its change "
               "masks with the labels. The dataset folder holds <code>A/</code> (before), <code>B/</code> "
               "(after) and <code>label/</code> (0 = no change, 1 or 255 = change) with the same file names; "
               "a label with other values is refused. "
               "Images no larger than a tile are predicted whole, as the papers test; larger ones tile by "
               "tile.</p><p>Every metric is given twice: <b>global</b> (confusion counts summed over the "
               "whole set, as papers report) and <b>per image</b> (averaged over images; undefined ratios of "
               "an image are left out).</p>")
    PARAMETER_HELP = {
        **MODEL_HELP,
        **option_help(names(EVALUATE)),
        "DATA": "The dataset folder with <code>A/</code>, <code>B/</code> and <code>label/</code>.",
        "THRESHOLD": "Probability above which a pixel counts as changed. Empty: the package's.",
        "IGNORE_VALUE": "Label value of unlabelled pixels, which count in no metric (e.g. 255 in a sparse "
                        "label of 0 = no change, 1 = change). Empty: every pixel is labelled but those of a label "
                        "file's own nodata value.",
        "OUTPUT": "The metrics table (metric, meaning, global, per image), then the image count and the "
                  "summed confusion counts: HTML (shown in the results viewer) or CSV, chosen by the file "
                  "extension.",
        "IMAGES": "How many image pairs were evaluated.",
        **{name: f"Global {METRICS[key]}." for name, key in NUMERIC_OUTPUTS.items()},
    }
    NOTES = ENGINE_NOTES
    OPTIONS = names(EVALUATE)
    FLAGS = {"--ignore-value": "IGNORE_VALUE"}

    def tags(self):
        return tr("evaluate,metrics,accuracy,f1,iou,test,dataset").split(",")

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS's name)
        for parameter in model_parameters():
            self.addParameter(parameter)
        self.addParameter(QgsProcessingParameterFile("DATA", tr("Dataset folder (A/, B/, label/)"),
                                                     behavior=QgsProcessingParameterFile.Folder))
        add_options(self)
        self.addParameter(QgsProcessingParameterNumber("IGNORE_VALUE", tr("Label value of unlabelled pixels"),
                                                       QgsProcessingParameterNumber.Double, optional=True))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", tr("Metrics table"),
                                                                fileFilter=tr(TABLE_FILTER)))
        self.addOutput(QgsProcessingOutputNumber("IMAGES", tr("Images evaluated")))
        for name, key in NUMERIC_OUTPUTS.items():
            self.addOutput(QgsProcessingOutputNumber(name, tr(METRICS[key].capitalize())))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        model = chosen_model(self, parameters, context)
        data = self.parameterAsFile(parameters, "DATA", context)
        table = self.output_path(parameters, "OUTPUT", context, TABLE_SUFFIXES)
        args = {"model": model, "data": data, **option_values(self, parameters, context),
                "ignore_value": self.optional_double(parameters, "IGNORE_VALUE", context)}
        summary = self.run_engine("evaluate", args, feedback)
        rows = [[name, tr(meaning), summary["global"][name], summary["per_image"][name]]
                for name, meaning in METRICS.items()]
        rows += [["images", tr("image pairs evaluated"), summary["images"], ""]]
        rows += [[name, tr(meaning), summary["confusion"][name], ""] for name, meaning in COUNTS.items()]
        notes = [tr("model {}, dataset {}").format(model, data)]
        write_table(table, tr("GeoChange evaluation of {}").format(Path(model).name),
                    [tr("metric"), tr("meaning"), tr("global"), tr("per image")], rows, notes)
        for note in notes:
            feedback.pushInfo(note)
        feedback.pushInfo(tr("global F1 {:.4f}, IoU {:.4f}").format(summary["global"]["f1"], summary["global"]["iou"]))
        return {"OUTPUT": table, "IMAGES": summary["images"],
                **{name: summary["global"][key] for name, key in NUMERIC_OUTPUTS.items()}}
