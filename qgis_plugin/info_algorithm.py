"""Processing algorithm ``geochange:modelinfo``: a model package's manifest as a table."""
from __future__ import annotations

from pathlib import Path

from qgis.core import QgsProcessingOutputNumber, QgsProcessingOutputString, QgsProcessingParameterFileDestination

from geochange.qgis_plugin.engine_algorithm import EngineAlgorithm, tr
from geochange.qgis_plugin.parameters import MODEL_HELP, chosen_model, model_parameters
from geochange.qgis_plugin.tables import TABLE_FILTER, TABLE_SUFFIXES, flatten, write_table


class ModelInfoAlgorithm(EngineAlgorithm):
    NAME = "modelinfo"
    DISPLAY_NAME = "Model information"
    GROUP = "models"
    SUMMARY = ("<p>Shows what a GeoChange model package holds: its architecture and that architecture's "
               "description and published size, the bands, modality and scaling each date must have, the "
               "output activation and default threshold, how and on what it was trained, its source and "
               "licence. For an O-P router package: its CAR thresholds and the manifest of the original model "
               "and of each teacher. The package's tensors are not loaded.</p>")
    PARAMETER_HELP = {
        "ZOO_MODEL": MODEL_HELP["ZOO_MODEL"],
        "MODEL": MODEL_HELP["MODEL"].split(" Pickled")[0],
        "OUTPUT": "The manifest as a two-column table (field, value): HTML (shown in the results viewer) or "
                  "CSV, chosen by the file extension.",
        "ARCHITECTURE": "The registered architecture name (e.g. <code>tinycd</code>); for a router package, "
                        "its original model's and the number of teachers.",
        "THRESHOLD": "The package's default change threshold.",
    }

    def tags(self):
        return tr("model,manifest,package,metadata,information").split(",")

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS's name)
        for parameter in model_parameters():
            self.addParameter(parameter)
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", tr("Model information table"),
                                                                fileFilter=tr(TABLE_FILTER)))
        self.addOutput(QgsProcessingOutputString("ARCHITECTURE", tr("Architecture")))
        self.addOutput(QgsProcessingOutputNumber("THRESHOLD", tr("Default threshold")))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        model = chosen_model(self, parameters, context)
        table = self.output_path(parameters, "OUTPUT", context, TABLE_SUFFIXES)
        info = self.run_engine("info", {"model": model}, feedback)
        feedback.pushInfo(info["text"])
        rows = flatten(info["manifest"]) + flatten(info["registry"], "architecture_info")
        write_table(table, tr("GeoChange model {}").format(Path(model).name), [tr("field"), tr("value")], rows,
                    [model, info["architecture"]])
        return {"OUTPUT": table, "ARCHITECTURE": info["architecture"], "THRESHOLD": info["threshold"]}
