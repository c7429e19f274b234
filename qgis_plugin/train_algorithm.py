"""Processing algorithm ``geochange:trainmodel``: a training config (plus overrides) into a model package."""
from __future__ import annotations

import html
import json
import os
from pathlib import Path

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputFolder,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
)

from geochange.engine.architectures import architecture_names
from geochange.engine.errors import GeoChangeError
from geochange.engine.header import read_metadata
from geochange.engine.options import spec as detect_option
from geochange.engine.zoo import resolve_model
from geochange.qgis_plugin.engine_algorithm import EngineAlgorithm, tr
from geochange.qgis_plugin.parameters import ENGINE_NOTES, MODEL_FILTER, chosen_model, model_parameters
from geochange.qgis_plugin.worker_client import PLUGIN_ROOT

CONFIGS = PLUGIN_ROOT / "trainer" / "configs"
FROM_START = "the starting model's (else the configuration's)"
# The dialog's values as the trainer's config keys (the trainer's --set), applied over the configuration.
NUMBER_KEYS = {"ITERATIONS": "schedule.iterations", "CROP_SIZE": "augment.crop.size", "BATCH_SIZE": "data.batch"}
# Without a configuration the trainer's defaults apply, whose warm-up (1000 iterations, for runs of 100k and
# more) would refuse the short runs a dialog starts: it is a tenth of the run instead.
WARMUP_SHARE = 0.1
# And its validations and checkpoints (every 1000 iterations) would leave a cancelled run nothing to resume
# from: they come every tenth of the run instead.
CHECKPOINT_SHARE = 0.1
# The trainer's smallest crop (trainer.config.MIN_CROP): the crop becomes the package's tile, which detect's
# default overlap must stay under.
MIN_CROP = detect_option("overlap").default + 1
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
    SUMMARY = ("<p>Trains a change-detection model and writes the best weights by validation mIoU as a model "
               "package for <i>Detect changes</i>, with the configuration, data and metrics in its manifest.</p>"
               "<p>Give a dataset folder, an architecture or a model to start from, the number of iterations "
               "(and the crop size and batch if you wish): the trainer's defaults do the rest. A GeoChange "
               "training configuration (a YAML file) describes everything else (augmentation, loss, optimiser, "
               "schedule, validation, test, several datasets); the values given here replace its own.</p>"
               "<p>Progress and the loss, learning rate and validation metrics come from the run's logs "
               "(<code>train_log.csv</code>, <code>val_log.csv</code> in the work folder). A cancelled run "
               "keeps its last checkpoint: run again with <i>Resume</i> to continue from it.</p>")
    PARAMETER_HELP = {
        "CONFIG": "The training configuration (YAML), optional. Relative paths in it (datasets, weights, work "
                  "folder) are taken from its own folder. Without one, the trainer's defaults apply (its warm-up "
                  "shortened to a tenth of the run) and the run is named after the output package.",
        "DATASET": "A folder dataset: <code>A/</code> (before), <code>B/</code> (after) and <code>label/</code> "
                   "(0/1 or 0/255) images of the same names, or <code>train/</code>, <code>val/</code> and "
                   "<code>test/</code> folders each holding those three. It replaces the configuration's "
                   "datasets.",
        "VAL_SHARE": "Where the dataset folder has no <code>val/</code> folder, the share of its training pairs "
                     "(drawn with seed 0) kept for validation, which picks the best weights.",
        "ARCHITECTURE": "The network to train (<code>geochange models</code> lists them with their papers and "
                        "sizes). By default the starting model's, with its inputs (bands, modality, scaling), "
                        "else the configuration's.",
        "ZOO_MODEL": "A model of the zoo whose weights start the run (fine-tuning); <i>none</i> for the model "
                     "file below, or for random weights when that is empty too.",
        "MODEL": "A GeoChange model package (<code>.safetensors</code>) whose weights start the run, where no "
                 "zoo model is chosen.",
        "ITERATIONS": "Training iterations (batches). Needed without a configuration.",
        "CROP_SIZE": "The side in pixels of the random crops the network learns on; it also becomes the tile "
                     "<i>Detect changes</i> uses by default.",
        "BATCH_SIZE": "Image pairs per iteration.",
        "OVERRIDES": "Values replacing the configuration's, one <code>key=value</code> per line (or separated by "
                     "<code>;</code>), as the command line's <code>--set</code>: e.g. "
                     "<code>schedule.iterations=2000</code>, <code>data.batch=4</code>, <code>device=cuda:1</code>, "
                     "<code>data.datasets.0.root=/data/levir</code>. Values are read as YAML.",
        "WORK_DIR": "Where the run keeps its checkpoint, logs and best package. Empty: the configuration's "
                    "<code>work_dir</code>, else <code>runs/&lt;name&gt;</code> beside the configuration (without one, "
                    "beside the output package).",
        "RESUME": "Continue the run in the work folder from its last checkpoint instead of starting afresh.",
        "RESTART": "Start afresh in a work folder that holds an earlier run, replacing it (without it, such a run "
                   "is refused, so that a run that fails cannot destroy a finished one).",
        "OUTPUT": "The trained model package (<code>.safetensors</code>): a copy of the run's best package.",
        "WORK_FOLDER": "The run's work folder.",
        "BEST_ITERATION": "The iteration whose weights were kept (best validation mIoU).",
        "VAL_F1": "Global change-class F1 on the validation split at that iteration.",
        "VAL_MIOU": "Global mIoU on the validation split at that iteration.",
        "TEST_F1": "Global change-class F1 on the test split (if the configuration has one), with the "
                   "configuration's test-time augmentation.",
        "TEST_MIOU": "Global mIoU on the test split.",
    }
    FLAGS = {"--resume": "RESUME", "--restart": "RESTART"}

    NOTES = ENGINE_NOTES

    def notes(self) -> str:
        return shipped_configs() + self.NOTES

    def tags(self):
        return tr("train,training,fine-tune,model,deep learning,pytorch").split(",")

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS's name)
        self.addParameter(QgsProcessingParameterFile("DATASET", tr("Dataset folder"),
                                                     behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addParameter(QgsProcessingParameterNumber("VAL_SHARE", tr("Validation share"),
                                                       QgsProcessingParameterNumber.Double, defaultValue=0.1,
                                                       minValue=0.0, maxValue=0.9))
        self.addParameter(QgsProcessingParameterEnum("ARCHITECTURE", tr("Architecture"), defaultValue=FROM_START,
                                                     options=[FROM_START, *architecture_names()],
                                                     usesStaticStrings=True))
        for parameter, label in zip(model_parameters(), (tr("Start from a zoo model"), tr("Start from a model file"))):
            parameter.setDescription(label)
            self.addParameter(parameter)
        numbers = {"ITERATIONS": (tr("Iterations"), 1), "CROP_SIZE": (tr("Crop size (px)"), MIN_CROP),
                   "BATCH_SIZE": (tr("Batch size"), 1)}
        for name, (label, minimum) in numbers.items():
            self.addParameter(QgsProcessingParameterNumber(name, label, QgsProcessingParameterNumber.Integer,
                                                           minValue=minimum, optional=True))
        self.addParameter(QgsProcessingParameterFile("CONFIG", tr("Training configuration (YAML) for the rest"),
                                                     fileFilter=tr("YAML files (*.yaml *.yml)"), optional=True))
        self.addParameter(QgsProcessingParameterString("OVERRIDES", tr("Overrides (key=value per line)"),
                                                       multiLine=True, optional=True))
        self.addParameter(QgsProcessingParameterFile("WORK_DIR", tr("Work folder"),
                                                     behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addParameter(QgsProcessingParameterBoolean("RESUME", tr("Resume from the last checkpoint"),
                                                        defaultValue=False))
        self.addParameter(QgsProcessingParameterBoolean("RESTART", tr("Replace an earlier run in the work folder"),
                                                        defaultValue=False))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", tr("Trained model package"),
                                                                fileFilter=tr(MODEL_FILTER.split(";;")[0])))
        self.addOutput(QgsProcessingOutputFolder("WORK_FOLDER", tr("Work folder of the run")))
        self.addOutput(QgsProcessingOutputNumber("BEST_ITERATION", tr("Best iteration")))
        for name in METRIC_OUTPUTS:
            split, metric = METRIC_OUTPUTS[name]
            self.addOutput(QgsProcessingOutputNumber(name, tr("{} {}").format(split.capitalize(), metric)))

    def checkParameterValues(self, parameters, context):  # noqa: N802 (QGIS's name)
        """What the dialog's values would give the trainer is checked at once (the trainer checks the rest)."""
        ok, message = super().checkParameterValues(parameters, context)
        if ok:
            try:
                self.dialog_overrides(parameters, context)
            except QgsProcessingException as error:
                return False, str(error)
        return ok, message

    def dialog_overrides(self, parameters, context) -> list[str]:
        """The dialog's values as the trainer's ``key=value`` overrides (values in JSON, which YAML reads)."""
        values = {name: self.parameterAsInt(parameters, name, context) for name in NUMBER_KEYS
                  if parameters.get(name) not in (None, "")}
        architecture = self.parameterAsEnumString(parameters, "ARCHITECTURE", context)
        start = chosen_model(self, parameters, context, required=False)
        dataset = self.parameterAsFile(parameters, "DATASET", context)
        settings = {key: values[name] for name, key in NUMBER_KEYS.items() if name in values}
        if not self.parameterAsFile(parameters, "CONFIG", context):
            if not (dataset and "ITERATIONS" in values and (start or architecture != FROM_START)):
                raise QgsProcessingException(tr("Without a training configuration (CONFIG), give a dataset "
                                                "(DATASET), the ITERATIONS, and an ARCHITECTURE or a model to start "
                                                "from (ZOO_MODEL or MODEL)"))
            output = self.parameterAsFileOutput(parameters, "OUTPUT", context)
            settings.update({"name": Path(output).stem or "geochange",
                             "schedule.warmup": int(values["ITERATIONS"] * WARMUP_SHARE),
                             "train.val_interval": max(1, int(values["ITERATIONS"] * CHECKPOINT_SHARE))})
        if dataset:
            dataset = os.path.abspath(dataset)  # the trainer reads relative paths from another working folder
            share = self.parameterAsDouble(parameters, "VAL_SHARE", context)
            split = {"split": {"val": share, "seed": 0}} if share > 0 and not (Path(dataset) / "val").is_dir() else {}
            settings["data.datasets"] = [{"root": dataset, **split}]
        if start:
            settings.update(self._starting_model(start, architecture == FROM_START))
        if architecture != FROM_START:
            settings["model.architecture"] = architecture
        return [f"{key}={json.dumps(value)}" for key, value in settings.items()]

    @staticmethod
    def _starting_model(model: str, with_architecture: bool) -> dict:
        """The settings of starting from ``model``: its weights, and its architecture, constructor arguments
        and inputs where the architecture is not chosen otherwise."""
        try:
            path = resolve_model(model)
            manifest = read_metadata(path)
        except GeoChangeError as error:
            raise QgsProcessingException(f"MODEL: {error}") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("architecture"), str) \
                or not isinstance(manifest.get("inputs"), dict):  # the engine names such a file's faults at its run
            raise QgsProcessingException(tr("MODEL: {} is no model package (a router package cannot start a run)")
                                         .format(model))
        settings = {"model.init": str(path.resolve())}
        if with_architecture:
            settings.update({"model.architecture": manifest["architecture"],
                             "model.kwargs": manifest.get("arch_kwargs") or {}, "data.inputs": manifest["inputs"]})
        return settings

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        package = self.output_path(parameters, "OUTPUT", context, (".safetensors",))
        args = {"config": self.parameterAsFile(parameters, "CONFIG", context) or None,
                "overrides": self.dialog_overrides(parameters, context)
                + parse_overrides(self.parameterAsString(parameters, "OVERRIDES", context)),
                "work_dir": self.parameterAsFile(parameters, "WORK_DIR", context) or None,
                "resume": self.parameterAsBool(parameters, "RESUME", context),
                "restart": self.parameterAsBool(parameters, "RESTART", context), "package": package}
        result = self.run_engine("train", args, feedback, [package])
        feedback.pushInfo(tr("best iteration {}; package {}").format(result["best_iteration"], package))
        metrics = {name: (result[split] or {}).get(key) for name, (split, key) in METRIC_OUTPUTS.items()}
        return {"OUTPUT": package, "WORK_FOLDER": result["work_dir"], "BEST_ITERATION": result["best_iteration"],
                **metrics}

