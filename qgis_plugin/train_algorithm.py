"""Processing algorithm ``geochange:trainmodel``: a training config (plus overrides) into a model package."""
from __future__ import annotations

import html

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputFolder,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterString,
)

from geochange.qgis_plugin.engine_algorithm import EngineAlgorithm, tr
from geochange.qgis_plugin.parameters import ENGINE_NOTES, MODEL_FILTER
from geochange.qgis_plugin.worker_client import PLUGIN_ROOT

CONFIGS = PLUGIN_ROOT / "trainer" / "configs"
# Global validation/test metrics given as numeric outputs.
METRIC_OUTPUTS = {"VAL_F1": ("val", "f1"), "VAL_MIOU": ("val", "mIoU"), "TEST_F1": ("test", "f1"),
                  "TEST_MIOU": ("test", "mIoU")}


def shipped_configs() -> str:
    """The configs that come with GeoChange, each with the first line of its header comment."""
    items = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")), "# ")
        items.append(f"<li><code>{html.escape(path.name)}</code>: {html.escape(first[1:].strip())}</li>")
    return f"<p>Configurations shipped in <code>{html.escape(str(CONFIGS))}</code>:</p><ul>{''.join(items)}</ul>" \
        if items else ""


def parse_overrides(text: str) -> list[str]:
    """One ``key=value`` per line (or separated by ``;``); blank lines and ``#`` comments are skipped."""
    overrides = []
    for part in text.replace(";", "\n").splitlines():
        part = part.strip()
        if part and not part.startswith("#"):
            if "=" not in part:
                raise QgsProcessingException(tr("Override '{}' is not key=value (e.g. schedule.iterations=2000)")
                                             .format(part))
            overrides.append(part)
    return overrides


class TrainModelAlgorithm(EngineAlgorithm):
    NAME = "trainmodel"
    DISPLAY_NAME = "Train a model"
    GROUP = "models"
    SUMMARY = ("<p>Trains a change-detection model as a GeoChange training configuration (a YAML file) "
               "describes it: architecture, datasets and their splits, augmentation, loss, optimiser, "
               "schedule, validation and test. The best weights by validation mIoU become a model package "
               "for <i>Detect changes</i>, with the configuration, data and metrics in its manifest.</p>"
               "<p>Progress and the loss, learning rate and validation metrics come from the run's logs "
               "(<code>train_log.csv</code>, <code>val_log.csv</code> in the work folder). A cancelled run "
               "keeps its last checkpoint: run again with <i>Resume</i> to continue from it.</p>")
    PARAMETER_HELP = {
        "CONFIG": "The training configuration (YAML). Relative paths in it (datasets, weights, work folder) "
                  "are taken from its own folder.",
        "OVERRIDES": "Values replacing the configuration's, one <code>key=value</code> per line (or separated by "
                     "<code>;</code>), as the command line's <code>--set</code>: e.g. "
                     "<code>schedule.iterations=2000</code>, <code>data.batch=4</code>, <code>device=cuda:1</code>, "
                     "<code>data.datasets.0.root=/data/levir</code>. Values are read as YAML.",
        "WORK_DIR": "Where the run keeps its checkpoint, logs and best package. Empty: the configuration's "
                    "<code>work_dir</code>, else <code>runs/&lt;name&gt;</code> beside the configuration.",
        "RESUME": "Continue the run in the work folder from its last checkpoint instead of starting afresh.",
        "OUTPUT": "The trained model package (<code>.safetensors</code>): a copy of the run's best package.",
        "WORK_FOLDER": "The run's work folder.",
        "BEST_ITERATION": "The iteration whose weights were kept (best validation mIoU).",
        "VAL_F1": "Global change-class F1 on the validation split at that iteration.",
        "VAL_MIOU": "Global mIoU on the validation split at that iteration.",
        "TEST_F1": "Global change-class F1 on the test split (if the configuration has one), with the "
                   "configuration's test-time augmentation.",
        "TEST_MIOU": "Global mIoU on the test split.",
    }

    NOTES = ENGINE_NOTES

    def notes(self) -> str:
        return shipped_configs() + self.NOTES

    def tags(self):
        return tr("train,training,fine-tune,model,deep learning,pytorch").split(",")

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS's name)
        self.addParameter(QgsProcessingParameterFile("CONFIG", tr("Training configuration"),
                                                     fileFilter=tr("YAML files (*.yaml *.yml)")))
        self.addParameter(QgsProcessingParameterString("OVERRIDES", tr("Overrides (key=value per line)"),
                                                       multiLine=True, optional=True))
        self.addParameter(QgsProcessingParameterFile("WORK_DIR", tr("Work folder"),
                                                     behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addParameter(QgsProcessingParameterBoolean("RESUME", tr("Resume from the last checkpoint"),
                                                        defaultValue=False))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", tr("Trained model package"),
                                                                fileFilter=tr(MODEL_FILTER.split(";;")[0])))
        self.addOutput(QgsProcessingOutputFolder("WORK_FOLDER", tr("Work folder of the run")))
        self.addOutput(QgsProcessingOutputNumber("BEST_ITERATION", tr("Best iteration")))
        for name in METRIC_OUTPUTS:
            split, metric = METRIC_OUTPUTS[name]
            self.addOutput(QgsProcessingOutputNumber(name, tr("{} {}").format(split.capitalize(), metric)))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        package = self.output_path(parameters, "OUTPUT", context, (".safetensors",))
        args = {"config": self.parameterAsFile(parameters, "CONFIG", context),
                "overrides": parse_overrides(self.parameterAsString(parameters, "OVERRIDES", context)),
                "work_dir": self.parameterAsFile(parameters, "WORK_DIR", context) or None,
                "resume": self.parameterAsBool(parameters, "RESUME", context), "package": package}
        result = self.run_engine("train", args, feedback, [package])
        feedback.pushInfo(tr("best iteration {}; package {}").format(result["best_iteration"], package))
        metrics = {name: (result[split] or {}).get(key) for name, (split, key) in METRIC_OUTPUTS.items()}
        return {"OUTPUT": package, "WORK_FOLDER": result["work_dir"], "BEST_ITERATION": result["best_iteration"],
                **metrics}

