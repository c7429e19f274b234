"""Processing algorithm ``geochange:detectchanges``: run a model package on a raster pair."""
from __future__ import annotations

from pathlib import Path

from qgis import utils as qgis_utils
from qgis.core import (
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorDestination,
    QgsProject,
    QgsRasterLayer,
)
from qgis.PyQt.QtCore import QCoreApplication, QThread

from geochange.engine.bands import check_dates_order, select_bands
from geochange.engine.contracts import MASK_CHANGE, MASK_NO_CHANGE, MASK_NODATA, PROBABILITY_NODATA
from geochange.engine.errors import GeoChangeError
from geochange.engine.options import DETECT, names
from geochange.qgis_plugin import styles
from geochange.qgis_plugin.engine_algorithm import (GEOTIFF, EngineAlgorithm, layer_file, overlap, raster_file,
                                                    same_raster, tr)
from geochange.qgis_plugin.parameters import (ENGINE_NOTES, MODEL_HELP, POLYGON_OUTPUTS_HELP, add_options, band_numbers,
                                              chosen_model, model_manifest, model_parameters, option_help,
                                              option_values, options_problem)
from geochange.qgis_plugin.worker_client import parameter_names


def dialog_pair(project, active) -> tuple | None:
    """The (pre, post) raster layers a dialog starts with: post the active layer, as Processing's own default
    (the top raster layer of the layer panel when the active layer is no raster); pre the nearest raster of
    another file below it in the layer panel (images are usually added in date order, the later one above),
    else above it. None without two rasters: Processing's defaults then stand."""
    rasters = [layer for layer in (node.layer() for node in project.layerTreeRoot().findLayers())
               if isinstance(layer, QgsRasterLayer) and layer_file(layer)]  # no basemap, no GeoPackage table
    ids = [layer.id() for layer in rasters]
    at = ids.index(active.id()) if active is not None and active.id() in ids else 0
    others = [layer for layer in rasters[at + 1:] + rasters[:at][::-1] if not same_raster(layer, rasters[at])]
    return (others[0], rasters[at]) if others else None


def _open_project_pair() -> tuple | None:
    """``dialog_pair`` of the QGIS desktop's project and active layer; None elsewhere (scripts, qgis_process,
    an algorithm made in a worker thread, where the project must not be read)."""
    app = QCoreApplication.instance()
    if qgis_utils.iface is None or app is None or QThread.currentThread() != app.thread():
        return None
    return dialog_pair(QgsProject.instance(), qgis_utils.iface.activeLayer())


class DetectChangesAlgorithm(EngineAlgorithm):
    NAME = "detectchanges"
    DISPLAY_NAME = "Detect changes"
    GROUP = "detection"
    SUMMARY = ("<p>Compares a raster taken before and a raster taken after an event with a change-detection "
               "network and writes where the scene changed: a change-probability raster, a change mask and "
               "change polygons.</p><p>The two rasters may differ in CRS, resolution and extent: both are read "
               "on one grid (the pre or the post raster's, or a CRS and resolution of your choice) over the "
               "area they share. The network runs on overlapping tiles whose seams are blended, so rasters "
               "of any size can be processed.</p>")
    PARAMETER_HELP = {
        **MODEL_HELP,
        **option_help(names(DETECT)),
        "MODEL": MODEL_HELP["MODEL"] + " An O-P router package (made by the MTKD pipeline) is run as such: its "
                 "original model predicts each tile, and the share of changed pixels it finds picks the teacher "
                 "whose prediction is kept.",
        "PRE": "The earlier image. Nodata pixels are skipped.",
        "POST": "The later image of the same area.",
        "THRESHOLD": option_help(["threshold"])["THRESHOLD"] + " Re-threshold later without running the model "
                     "with <i>Vectorise change probability</i>.",
        **POLYGON_OUTPUTS_HELP,
        "OUTPUT_PROBABILITY": f"Cloud-Optimised GeoTIFF on the output grid, float 0..1 per pixel; "
                              f"{PROBABILITY_NODATA:g} (nodata) where an input has no data. Loaded with a "
                              "pseudo-colour ramp.",
        "OUTPUT_MASK": f"Cloud-Optimised GeoTIFF, {MASK_CHANGE} = changed, {MASK_NO_CHANGE} = unchanged, "
                       f"{MASK_NODATA} = nodata. Loaded with changes in red and the rest transparent.",
        "OUTPUT_POLYGONS": "GeoPackage (or shapefile, GeoJSON) of the changed areas with their area in square metres "
                           "(<code>area_m2</code>) and the mean and maximum change probability inside them "
                           "(<code>mean_prob</code>, <code>max_prob</code>), and the names of the two rasters. "
                           "Loaded as outlines labelled with their area.",
    }
    NOTES = ENGINE_NOTES
    OPTIONS = names(DETECT)

    def tags(self):
        return tr("change,detection,deep learning,difference,bitemporal,pytorch").split(",")

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS's name)
        dates = [QgsProcessingParameterRasterLayer("PRE", tr("Pre-change raster")),
                 QgsProcessingParameterRasterLayer("POST", tr("Post-change raster"))]
        # Processing's dialog would start both dates on the active layer. The dialog's defaults only: a script
        # that leaves PRE out is still refused.
        for parameter, layer in zip(dates, _open_project_pair() or ()):
            parameter.setGuiDefaultValueOverride(layer.id())
        for parameter in dates:
            self.addParameter(parameter)
        for parameter in model_parameters():
            self.addParameter(parameter)
        add_options(self)
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT_PROBABILITY", tr("Change probability")))
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT_MASK", tr("Change mask")))
        self.addParameter(QgsProcessingParameterVectorDestination(
            "OUTPUT_POLYGONS", tr("Change polygons"), QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber("POLYGON_COUNT", tr("Number of change polygons")))
        self.addOutput(QgsProcessingOutputNumber("CHANGED_AREA_M2", tr("Changed area (m²)")))

    def checkParameterValues(self, parameters, context):  # noqa: N802 (QGIS's name)
        """Checked before the run, in the dialog (at once, not after the engine has started) as in scripts:
        one raster as both dates (what a dialog shows in a project of one raster file), which would only report
        no change after the whole run; the model's file and the band counts it needs; whether the dates overlap."""
        ok, message = super().checkParameterValues(parameters, context)
        pre, post = (self.parameterAsRasterLayer(parameters, name, context) for name in ("PRE", "POST"))
        if not ok or pre is None or post is None:
            return ok, message
        for name, layer in (("PRE", pre), ("POST", post)):
            try:  # a web, database or virtual layer: the reason here, not a band count it happens to have
                raster_file(layer, name)
            except QgsProcessingException as error:
                return False, str(error)
            own = layer.dataProvider().crs()
            if own.isValid() and layer.crs() != own:  # set in QGIS: the engine would use the file's
                return False, tr("{}: the layer's CRS ({}) was set in QGIS over its file's ({}), which GeoChange "
                                 "reads: give the file that CRS (Raster > Projections > Assign Projection), or set "
                                 "the layer's back").format(name, layer.crs().authid() or layer.crs().description(),
                                                            own.authid() or own.description())
        problem = options_problem(self, parameters, context)
        if problem:
            return False, problem
        if same_raster(pre, post):
            return False, tr("PRE and POST are the same raster ({}): choose the image from before the event and "
                             "the one from after it").format(pre.source())
        try:
            self._check_bands(parameters, context, pre, post)
        except (GeoChangeError, QgsProcessingException) as error:
            return False, parameter_names(str(error), self.parameter_flags())
        if not overlap(pre, post, context):
            return False, tr("PRE and POST do not overlap: {} ({}) and {} ({})").format(
                pre.name(), pre.crs().authid() or tr("no CRS"), post.name(), post.crs().authid() or tr("no CRS"))
        return True, ""

    def _check_bands(self, parameters, context, pre, post) -> None:
        """The bands each date gives the model (chosen, else all) against the model's manifest; a file that
        is no package, a pickle above all, is refused as the engine refuses it."""
        inputs = model_manifest(self, parameters, context).get("inputs") or {}
        if not all(isinstance(inputs.get(date), dict) and {"bands", "modality"} <= set(inputs[date])
                   for date in ("pre", "post")):
            return  # the engine names the fault
        layers = {"pre": pre, "post": post}
        chosen = {date: band_numbers(self, parameters, f"{date.upper()}_BANDS", context) for date in layers}
        names = {date: Path(layer_file(layer) or layer.name()).name for date, layer in layers.items()}  # as the engine
        check_dates_order((pre.bandCount(), post.bandCount()), inputs, tuple(chosen.values()), tuple(names.values()))
        for date, layer in layers.items():
            select_bands(layer.bandCount(), inputs[date], date, chosen[date], names[date])

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        polygons, polygon_layer, polygons_uri = self.polygon_output(parameters, "OUTPUT_POLYGONS", context)
        outputs = {
            "probability": self.output_path(parameters, "OUTPUT_PROBABILITY", context, GEOTIFF),
            "mask": self.output_path(parameters, "OUTPUT_MASK", context, GEOTIFF),
            "polygons": polygons,
        }
        args = {"pre": self.raster_path(parameters, "PRE", context),
                "post": self.raster_path(parameters, "POST", context),
                "model": chosen_model(self, parameters, context), **outputs, "polygon_layer": polygon_layer,
                **option_values(self, parameters, context)}
        result = self.run_engine("detect", args, feedback, outputs.values())

        # A pair without a CRS is a pixel grid: areas (and the minimum area) in pixels.
        feedback.pushInfo(tr("{} change polygons, {:.1f} {} changed").format(
            result["polygon_count"], result["changed_area_m2"], result["area_unit"]))
        pair = styles.pair_name(self.layer_name(parameters, "PRE", context),
                                self.layer_name(parameters, "POST", context))
        styles.style_outputs(context, feedback, [  # in the layer tree from the top
            (polygons_uri, tr("{}: change polygons").format(pair), styles.style_polygons),
            (outputs["mask"], tr("{}: change mask").format(pair), styles.style_mask),
            (outputs["probability"], tr("{}: change probability").format(pair), styles.style_probability)])
        return {"OUTPUT_PROBABILITY": result["probability"], "OUTPUT_MASK": result["mask"],
                "OUTPUT_POLYGONS": polygons_uri, "POLYGON_COUNT": result["polygon_count"],
                "CHANGED_AREA_M2": result["changed_area_m2"]}
