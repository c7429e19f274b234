"""Processing algorithm ``geochange:detectchanges``: run a model package on a raster pair."""
from __future__ import annotations

from qgis.core import (
    QgsProcessing,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBand,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterCrs,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
)
from qgis.core import QgsProcessingException

from geochange.engine.contracts import MASK_CHANGE, MASK_NO_CHANGE, MASK_NODATA, PROBABILITY_NODATA
from geochange.engine.zoo import zoo_index
from geochange.qgis_plugin import styles
from geochange.qgis_plugin.engine_algorithm import EngineAlgorithm, tr

# The engine's choices, in the order the enum parameters list them (the first is the engine's default).
GRIDS = ["pre", "post"]
PRECISIONS = ["bf16", "fp16", "fp32"]
MODEL_FILTER = "GeoChange model package (*.safetensors);;All files (*)"
NO_ZOO_MODEL = "none: the model file below"


def model_parameters() -> list:
    """A model file (``MODEL``), or a model of the zoo shipped with the plugin (``ZOO_MODEL``)."""
    # "All files" keeps other names acceptable, so that a wrong file (a .pth checkpoint...) gets the
    # engine's explanation instead of QGIS's bare "Incorrect parameter value".
    # Chosen by name, not position: saved models and batch runs keep their choice as the zoo grows.
    return [QgsProcessingParameterEnum("ZOO_MODEL", tr("Model from the zoo"), defaultValue=NO_ZOO_MODEL,
                                       options=[NO_ZOO_MODEL] + sorted(zoo_index()), usesStaticStrings=True),
            QgsProcessingParameterFile("MODEL", tr("Model file"), behavior=QgsProcessingParameterFile.File,
                                       fileFilter=tr(MODEL_FILTER), optional=True)]


def chosen_model(algorithm, parameters, context) -> str:
    """The zoo model's name, else the model file; one of them is needed."""
    choice = algorithm.parameterAsEnumString(parameters, "ZOO_MODEL", context)
    if choice and choice != NO_ZOO_MODEL:
        return choice
    model = algorithm.parameterAsFile(parameters, "MODEL", context)
    if not model:
        raise QgsProcessingException(tr("Choose a model from the zoo (ZOO_MODEL) or give a model file (MODEL)"))
    return model


def device_parameter(name="DEVICE"):
    # A free string rather than an enum: the GPU index (cuda:1, ...) depends on the machine.
    return QgsProcessingParameterString(name, tr("Device (auto, cpu, cuda, cuda:N)"), defaultValue="auto")


def integer_parameter(name, description, default, minimum):
    return QgsProcessingParameterNumber(name, description, QgsProcessingParameterNumber.Integer,
                                        defaultValue=default, minValue=minimum)


def tiling_parameters():
    tile = QgsProcessingParameterNumber("TILE_SIZE", tr("Tile size (pixels; empty = the model's)"),
                                        QgsProcessingParameterNumber.Integer, optional=True, minValue=32)
    return [tile,
            integer_parameter("OVERLAP", tr("Tile overlap (pixels)"), 64, 0),
            integer_parameter("BATCH_SIZE", tr("Batch size (tiles)"), 4, 1)]


def tta_parameter():
    return QgsProcessingParameterBoolean("TTA", tr("Test-time augmentation (scales x flips)"), defaultValue=False)


def threshold_parameter(name="THRESHOLD", default=None):
    description = tr("Change threshold (empty = the model's)") if default is None else tr("Change threshold")
    return QgsProcessingParameterNumber(name, description, QgsProcessingParameterNumber.Double,
                                        defaultValue=default, optional=default is None, minValue=0.0,
                                        maxValue=1.0)


def polygon_parameters():
    return [QgsProcessingParameterNumber("MIN_AREA", tr("Minimum polygon area (m²)"),
                                         QgsProcessingParameterNumber.Double, defaultValue=0.0, minValue=0.0),
            QgsProcessingParameterNumber("SIMPLIFY", tr("Simplify tolerance (map units)"),
                                         QgsProcessingParameterNumber.Double, defaultValue=0.0, minValue=0.0)]


COMMON_HELP = {
    "ZOO_MODEL": "A model trained by the GeoChange project and shipped with the plugin (<code>geochange zoo</code> "
                 "lists what each is for, its inputs, data and test figures); <i>none</i> to use the model file "
                 "below.",
    "MODEL": "A GeoChange model file (<code>.safetensors</code>) holding the weights, the architecture and "
             "how inputs are scaled; its manifest is printed in the log when the algorithm runs (and by "
             "<i>Model information</i>). Pickled PyTorch checkpoints (<code>.pth</code>) are refused: "
             "convert them with <code>geochange import-weights</code>.",
    "DEVICE": "<code>auto</code> (a GPU when one is usable, else the CPU), <code>cpu</code>, <code>cuda</code> "
              "or a given GPU such as <code>cuda:0</code>.",
    "TILE_SIZE": "Side in pixels of the square windows given to the network. Empty: the tile the model was "
                 "trained on (its package records it; 512 for packages that do not). A model that normalises "
                 "each window by its own statistics (TinyCD) predicts best in that window.",
    "TTA": "Test-time augmentation: the mean of the change probabilities of every tile resized by the scales "
           "the model was tested with, as it is and flipped left-right (0.75, 1 and 1.25 when the package records "
           "none: six times slower, often slightly more accurate).",
    "OVERLAP": "Pixels shared by neighbouring windows; their predictions are blended so that no seams appear.",
    "BATCH_SIZE": "Windows run together; lower it if memory runs out.",
    "MIN_AREA": "Change polygons smaller than this (square metres, geodesic) are dropped.",
    "SIMPLIFY": "Polygon outlines are simplified with this tolerance, in the units of the raster's CRS; "
                "0 keeps the pixel outlines.",
    "POLYGON_COUNT": "How many change polygons were written.",
    "CHANGED_AREA_M2": "Their total area in square metres (in pixels for two rasters without a CRS, which are "
                       "paired pixel for pixel).",
}

ENGINE_NOTES = ("<p>The model runs in a separate Python process (see <i>Settings &gt; Options &gt; "
                "Processing &gt; Providers &gt; GeoChange</i>), so a crash of PyTorch or the GPU driver cannot "
                "take QGIS down; Cancel stops it. Nothing is written under the output names if the run "
                "fails or is cancelled.</p>")


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
        **COMMON_HELP,
        "MODEL": COMMON_HELP["MODEL"] + " An O-P router package (made by the MTKD pipeline) is run as such: its "
                 "original model predicts each tile, and the share of changed pixels it finds picks the teacher "
                 "whose prediction is kept.",
        "PRE": "The earlier image. Nodata pixels are skipped.",
        "POST": "The later image of the same area.",
        "GRID": "Whose grid (CRS, pixel size, pixel lattice) the outputs take; the other date is resampled "
                "onto it (bilinear). The outputs cover the intersection of both footprints.",
        "CRS": "Write the outputs in this CRS instead of the chosen raster's.",
        "RESOLUTION": "Pixel size of the outputs, in the units of their CRS. Empty: the chosen raster's.",
        "SAR_DB": "Float SAR rasters hold backscatter in dB (otherwise linear power is assumed). Only for "
                  "models whose manifest marks a date as SAR.",
        "PRE_SCALE": "The raw pre value that means 1.0 to the model. Empty: the model's when the data types "
                     "agree, else by data type (255 for 8-bit, 10000 for 16-bit reflectance, 1 for float).",
        "POST_SCALE": "The same for the post raster.",
        "PRECISION": "Arithmetic on a GPU: <code>bf16</code> and <code>fp16</code> are faster and use less "
                     "memory; the CPU always runs <code>fp32</code>.",
        "THREADS": "CPU threads PyTorch may use. Empty: PyTorch's default (all cores).",
        "PRE_BANDS": "Bands of the pre raster to give the model, in the model's order (e.g. 3, 2, 1 for a "
                     "BGR file and an RGB model). Empty: all bands, which must then be as many as the model "
                     "expects (the manifest lists them).",
        "POST_BANDS": "Bands of the post raster, as for the pre raster.",
        "THRESHOLD": "Probability above which a pixel counts as changed. Empty: the threshold stored in the "
                     "model package (usually 0.5). Re-threshold later without running the model with "
                     "<i>Vectorise change probability</i>.",
        "OUTPUT_PROBABILITY": f"Cloud-Optimised GeoTIFF on the output grid, float 0..1 per pixel; "
                              f"{PROBABILITY_NODATA:g} (nodata) where an input has no data. Loaded with a "
                              "pseudo-colour ramp.",
        "OUTPUT_MASK": f"Cloud-Optimised GeoTIFF, {MASK_CHANGE} = changed, {MASK_NO_CHANGE} = unchanged, "
                       f"{MASK_NODATA} = nodata. Loaded with changes in red and the rest transparent.",
        "OUTPUT_POLYGONS": "GeoPackage of the changed areas with their area in square metres "
                           "(<code>area_m2</code>) and the mean and maximum change probability inside them "
                           "(<code>mean_prob</code>, <code>max_prob</code>), and the names of the two rasters. "
                           "Loaded as outlines labelled with their area.",
    }
    NOTES = ENGINE_NOTES

    # The engine's ``detect`` options: an engine option reaches QGIS by adding its parameter in
    # initAlgorithm and a line here.
    ENGINE_OPTIONS = {
        "PRE_BANDS": ("pre_bands", lambda a, p, c: a.parameterAsInts(p, "PRE_BANDS", c) or None),
        "POST_BANDS": ("post_bands", lambda a, p, c: a.parameterAsInts(p, "POST_BANDS", c) or None),
        "DEVICE": ("device", lambda a, p, c: a.parameterAsString(p, "DEVICE", c).strip() or "auto"),
        "TILE_SIZE": ("tile", lambda a, p, c: int(a.optional_double(p, "TILE_SIZE", c) or 0) or None),
        "OVERLAP": ("overlap", lambda a, p, c: a.parameterAsInt(p, "OVERLAP", c)),
        "BATCH_SIZE": ("batch", lambda a, p, c: a.parameterAsInt(p, "BATCH_SIZE", c)),
        "THRESHOLD": ("threshold", lambda a, p, c: a.optional_double(p, "THRESHOLD", c)),
        "MIN_AREA": ("min_area", lambda a, p, c: a.parameterAsDouble(p, "MIN_AREA", c)),
        "SIMPLIFY": ("simplify", lambda a, p, c: a.parameterAsDouble(p, "SIMPLIFY", c)),
        "GRID": ("grid", lambda a, p, c: GRIDS[a.parameterAsEnum(p, "GRID", c)]),
        "CRS": ("crs", lambda a, p, c: a.optional_crs(p, "CRS", c)),
        "RESOLUTION": ("resolution", lambda a, p, c: a.optional_double(p, "RESOLUTION", c) or None),
        "SAR_DB": ("sar_db", lambda a, p, c: a.parameterAsBool(p, "SAR_DB", c)),
        "PRE_SCALE": ("pre_scale", lambda a, p, c: a.optional_double(p, "PRE_SCALE", c) or None),
        "POST_SCALE": ("post_scale", lambda a, p, c: a.optional_double(p, "POST_SCALE", c) or None),
        "PRECISION": ("precision", lambda a, p, c: PRECISIONS[a.parameterAsEnum(p, "PRECISION", c)]),
        "TTA": ("tta", lambda a, p, c: a.parameterAsBool(p, "TTA", c)),
        "THREADS": ("threads", lambda a, p, c: a.parameterAsInt(p, "THREADS", c) or None),
    }

    def tags(self):
        return tr("change,detection,deep learning,difference,bitemporal,pytorch").split(",")

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS's name)
        self.addParameter(QgsProcessingParameterRasterLayer("PRE", tr("Pre-change raster")))
        self.addParameter(QgsProcessingParameterRasterLayer("POST", tr("Post-change raster")))
        for parameter in model_parameters():
            self.addParameter(parameter)
        for date, description in (("PRE", tr("Pre-change bands, in the model's order")),
                                  ("POST", tr("Post-change bands, in the model's order"))):
            self.addParameter(QgsProcessingParameterBand(f"{date}_BANDS", description, parentLayerParameterName=date,
                                                         optional=True, allowMultiple=True))
        self.addParameter(QgsProcessingParameterEnum("GRID", tr("Output grid"), options=[
            tr("the pre-change raster's"), tr("the post-change raster's")], defaultValue=0))
        self.addParameter(device_parameter())
        for parameter in tiling_parameters():
            self.addParameter(parameter)
        self.addParameter(threshold_parameter())
        for parameter in polygon_parameters():
            self.addParameter(parameter)
        self.addParameter(QgsProcessingParameterBoolean("SAR_DB", tr("SAR rasters are in dB"), defaultValue=False))
        self.addParameter(tta_parameter())
        advanced = [
            QgsProcessingParameterCrs("CRS", tr("Output CRS (empty = the grid raster's)"), optional=True),
            QgsProcessingParameterNumber("RESOLUTION", tr("Output pixel size (empty = the grid raster's)"),
                                         QgsProcessingParameterNumber.Double, optional=True, minValue=0.0),
            QgsProcessingParameterNumber("PRE_SCALE", tr("Pre raw value meaning 1.0 (empty = by data type)"),
                                         QgsProcessingParameterNumber.Double, optional=True, minValue=0.0),
            QgsProcessingParameterNumber("POST_SCALE", tr("Post raw value meaning 1.0 (empty = by data type)"),
                                         QgsProcessingParameterNumber.Double, optional=True, minValue=0.0),
            QgsProcessingParameterEnum("PRECISION", tr("GPU precision"), options=PRECISIONS, defaultValue=0),
            QgsProcessingParameterNumber("THREADS", tr("CPU threads (empty = all)"),
                                         QgsProcessingParameterNumber.Integer, optional=True, minValue=1),
        ]
        for parameter in advanced:
            parameter.setFlags(parameter.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(parameter)
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT_PROBABILITY", tr("Change probability")))
        self.addParameter(QgsProcessingParameterRasterDestination("OUTPUT_MASK", tr("Change mask")))
        self.addParameter(QgsProcessingParameterVectorDestination(
            "OUTPUT_POLYGONS", tr("Change polygons"), QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber("POLYGON_COUNT", tr("Number of change polygons")))
        self.addOutput(QgsProcessingOutputNumber("CHANGED_AREA_M2", tr("Changed area (m²)")))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        outputs = {
            "probability": self.output_path(parameters, "OUTPUT_PROBABILITY", context, (".tif", ".tiff")),
            "mask": self.output_path(parameters, "OUTPUT_MASK", context, (".tif", ".tiff")),
            "polygons": self.output_path(parameters, "OUTPUT_POLYGONS", context, (".gpkg",)),
        }
        args = {"pre": self.raster_path(parameters, "PRE", context),
                "post": self.raster_path(parameters, "POST", context),
                "model": chosen_model(self, parameters, context), **outputs,
                **self.engine_options(parameters, context)}
        result = self.run_engine("detect", args, feedback, outputs.values())

        # A pair without a CRS is a pixel grid: areas (and the minimum area) in pixels.
        feedback.pushInfo(tr("{} change polygons, {:.1f} {} changed").format(
            result["polygon_count"], result["changed_area_m2"], result["area_unit"]))
        pair = tr("{} vs {}").format(self.layer_name(parameters, "PRE", context),
                                     self.layer_name(parameters, "POST", context))
        styles.load_styled(context, outputs["probability"], tr("{}: change probability").format(pair),
                           styles.style_probability)
        styles.load_styled(context, outputs["mask"], tr("{}: change mask").format(pair), styles.style_mask)
        styles.load_styled(context, outputs["polygons"], tr("{}: change polygons").format(pair),
                           styles.style_polygons)
        return {"OUTPUT_PROBABILITY": result["probability"], "OUTPUT_MASK": result["mask"],
                "OUTPUT_POLYGONS": result["polygons"], "POLYGON_COUNT": result["polygon_count"],
                "CHANGED_AREA_M2": result["changed_area_m2"]}
