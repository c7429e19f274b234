"""Processing algorithm ``geochange:detectmanypairs``: detection over many raster pairs (a CSV file or two
folders) on a Dask cluster, this machine's unless the provider's setting names a scheduler."""
from __future__ import annotations

import glob

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingOutputVectorLayer,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterFile,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsSettings,
)

from geochange.engine.contracts import PAIR_DONE, PAIR_FAILED, PAIR_SKIPPED, SUMMARY_LAYER
from geochange.engine.options import DETECT, flag, names, spec
from geochange.qgis_plugin import styles
from geochange.qgis_plugin.engine_algorithm import EngineAlgorithm, tr
from geochange.qgis_plugin.parameters import (ENGINE_NOTES, MODEL_HELP, add_options, band_numbers, chosen_model,
                                              model_parameters, option_help, option_values, options_problem)
from geochange.qgis_plugin.worker_client import parameter_names

# The provider's setting (Options > Processing > Providers > GeoChange): a Dask scheduler's address.
SCHEDULER_SETTING = "GEOCHANGE_DASK_SCHEDULER"
SCHEDULER_SETTING_KEY = "Processing/Configuration/" + SCHEDULER_SETTING
# Band lists are typed as text here: a band parameter lists the bands of one raster layer, and the pairs' rasters
# are files the algorithm never loads.
BAND_OPTIONS = [name for name in names(DETECT) if spec(name).metadata["kind"] == "bands"]
COUNTS = {"DONE": PAIR_DONE, "SKIPPED": PAIR_SKIPPED, "FAILED": PAIR_FAILED}


def scheduler_address() -> str | None:
    return str(QgsSettings().value(SCHEDULER_SETTING_KEY, "") or "").strip() or None


class DetectManyPairsAlgorithm(EngineAlgorithm):
    NAME = "detectmanypairs"
    DISPLAY_NAME = "Detect changes in many pairs"
    GROUP = "detection"
    SUMMARY = ("<p>Runs <i>Detect changes</i> on many raster pairs, listed in a CSV file or paired by name in two "
               "folders, on a Dask cluster: by default one of this computer's, with as many workers as its cores "
               "(one per GPU) and memory allow; with a scheduler address in <i>Settings &gt; Options &gt; "
               "Processing &gt; Providers &gt; GeoChange</i>, that cluster's.</p><p>Each pair's probability, "
               "mask and polygons go to a folder of its name in the output folder. A pair that fails (a bad file, "
               "rasters that do not overlap) is recorded with its error and the others go on. Run again into the "
               "same folder, only the pairs not complete are run. A summary layer of every pair's footprint, "
               "status, error, polygon count and changed area is loaded.</p>")
    PARAMETER_HELP = {
        **MODEL_HELP,
        **option_help(names(DETECT)),
        "PAIRS": "A CSV file with the columns <code>pre</code> and <code>post</code> (the rasters' paths, relative to "
                 "the CSV's folder or absolute) and optionally <code>name</code> (the pair's output folder; default: "
                 "the post file's name) and <code>aoi</code> (the pair's own area of interest). Leave empty to give "
                 "two folders instead.",
        "PRE_FOLDER": "Instead of a CSV: the folder of the rasters before the event.",
        "POST_FOLDER": "The folder of the rasters after it: a file pairs with the file of the same name in the pre "
                       "folder, which names the pair.",
        "PATTERN": "Which files of the two folders are rasters (a pattern, e.g. <code>*.tif</code>).",
        "PRE_BANDS": "1-based bands of every pre raster to give the model, in the model's order, as text (e.g. "
                     "<code>3,2,1</code>). Empty: all bands, which must then be as many as the model expects.",
        "POST_BANDS": "Bands of every post raster, as for the pre rasters.",
        "AOI": option_help(["aoi"])["AOI"] + " A pair's <code>aoi</code> in the CSV wins over it.",
        "WORKERS": "Workers of the cluster on this computer. Empty: one per GPU, else one per core, as many as the "
                   "memory holds at a worker's measured peak. Not for a cluster given by its scheduler.",
        "FORCE": "Run the pairs whose outputs are already complete again.",
        "OUTPUT": "The folder of the pairs' folders, <code>summary.gpkg</code> and <code>summary.csv</code>.",
        "SUMMARY": "The summary layer: each pair's footprint (EPSG:4326) with its name, status (done, skipped: "
                   "complete from an earlier run, failed), error, rasters, polygon count, changed area, seconds "
                   "and the model's sha256. Loaded with its outline coloured by status.",
        "DONE": "Pairs detected in this run.",
        "SKIPPED": "Pairs complete from an earlier run, not run again.",
        "FAILED": "Pairs that failed (their errors are in the log and the summary).",
    }
    NOTES = ENGINE_NOTES + ("<p>The cluster's workers run the engine too: on a cluster, every worker needs GeoChange "
                            "installed and the same paths to the rasters, the model and the output folder.</p>")
    OPTIONS = [name for name in names(DETECT) if name not in BAND_OPTIONS]
    FLAGS = {**{flag(name): spec(name).metadata["parameter"] for name in BAND_OPTIONS}, "--workers": "WORKERS",
             "--pre-glob": "PRE_FOLDER", "--post-glob": "POST_FOLDER",
             "--scheduler": "the GeoChange setting 'Dask scheduler'"}

    def tags(self):
        return tr("change,detection,batch,many,pairs,dask,cluster,tiles").split(",")

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS's name)
        self.addParameter(QgsProcessingParameterFile("PAIRS", tr("Pairs (CSV file)"), extension="csv",
                                                     optional=True))
        for name, label in (("PRE_FOLDER", tr("Or: folder of the pre-change rasters")),
                            ("POST_FOLDER", tr("and folder of the post-change rasters"))):
            self.addParameter(QgsProcessingParameterFile(name, label, behavior=QgsProcessingParameterFile.Folder,
                                                         optional=True))
        self.addParameter(QgsProcessingParameterString("PATTERN", tr("Raster files in the folders"),
                                                       defaultValue="*.tif"))
        for parameter in model_parameters():
            self.addParameter(parameter)
        for name in BAND_OPTIONS:
            self.addParameter(QgsProcessingParameterString(spec(name).metadata["parameter"],
                                                           tr(spec(name).metadata["label"]), optional=True))
        add_options(self)
        workers = QgsProcessingParameterNumber("WORKERS", tr("Workers on this computer (empty = as it allows)"),
                                               QgsProcessingParameterNumber.Integer, optional=True, minValue=1)
        workers.setFlags(workers.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(workers)
        self.addParameter(QgsProcessingParameterBoolean("FORCE", tr("Run complete pairs again"), defaultValue=False))
        self.addParameter(QgsProcessingParameterFolderDestination("OUTPUT", tr("Output folder")))
        self.addOutput(QgsProcessingOutputVectorLayer("SUMMARY", tr("Summary of the pairs")))
        for name, label in (("DONE", "Pairs detected"), ("SKIPPED", "Pairs complete already"),
                            ("FAILED", "Pairs failed")):
            self.addOutput(QgsProcessingOutputNumber(name, tr(label)))

    def checkParameterValues(self, parameters, context):  # noqa: N802 (QGIS's name)
        """The options the engine would refuse, refused in the dialog before any engine or cluster starts."""
        ok, message = super().checkParameterValues(parameters, context)
        if ok:
            try:  # the pairs given one way, and band lists the engine reads
                self._pairs(parameters, context)
                self._bands(parameters, context)
            except QgsProcessingException as error:
                return False, str(error)
        problem = options_problem(self, parameters, context) if ok else None
        return (False, problem) if problem else (ok, message)

    def _pairs(self, parameters, context) -> dict:
        """The engine's arguments for the pairs: the CSV file, or the two folders as glob patterns."""
        table = self.parameterAsFile(parameters, "PAIRS", context)
        pre, post = (self.parameterAsFile(parameters, name, context) for name in ("PRE_FOLDER", "POST_FOLDER"))
        if bool(table) == bool(pre or post) or bool(pre) != bool(post):
            raise QgsProcessingException(tr("Give the pairs as a CSV file (PAIRS) or as two folders (PRE_FOLDER and "
                                            "POST_FOLDER)"))
        if table:
            return {"table": table}
        pattern = self.parameterAsString(parameters, "PATTERN", context).strip() or "*.tif"
        return {"pre_glob": f"{glob.escape(pre)}/{pattern}", "post_glob": f"{glob.escape(post)}/{pattern}"}

    def _bands(self, parameters, context) -> dict:
        return {name: band_numbers(self, parameters, spec(name).metadata["parameter"], context)
                for name in BAND_OPTIONS}

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        scheduler = scheduler_address()
        workers = parameters.get("WORKERS")
        args = {**self._pairs(parameters, context), "model": chosen_model(self, parameters, context),
                "out": self.parameterAsFileOutput(parameters, "OUTPUT", context),
                "scheduler": scheduler, "force": self.parameterAsBool(parameters, "FORCE", context),
                "workers": None if workers in (None, "") else self.parameterAsInt(parameters, "WORKERS", context),
                **option_values(self, parameters, context), **self._bands(parameters, context)}
        feedback.pushInfo(tr("on the Dask cluster at {}").format(scheduler) if scheduler else
                          tr("on a Dask cluster of this computer"))
        result = self.run_engine("detect_many", args, feedback)

        for name, error in result["failed"].items():
            feedback.reportError(tr("{}: {}").format(name, parameter_names(error, self.parameter_flags())))
        counts = {name: result["counts"].get(status, 0) for name, status in COUNTS.items()}
        feedback.pushInfo(tr("{DONE} pairs detected, {SKIPPED} complete already, {FAILED} failed").format(**counts))
        summary = f"{result['summary']}|layername={SUMMARY_LAYER}"
        context.addLayerToLoadOnCompletion(summary, QgsProcessingContext.LayerDetails(
            tr("change detection over many pairs"), context.project(), "SUMMARY"))
        styles.style_outputs(context, feedback,
                             [(summary, tr("pairs: change detection summary"), styles.style_summary)])
        return {"OUTPUT": args["out"], "SUMMARY": summary, **counts}
