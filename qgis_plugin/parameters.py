"""The parameters the GeoChange algorithms share: the model (a zoo name or a file) and the engine's run
options, made from their one definition (``engine.options``) with their help; and reading them back as the
engine's keyword arguments."""
from __future__ import annotations

import html
import os

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterBand,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterCrs,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterString,
    QgsProviderRegistry,
)

from geochange.engine.bands import band_list
from geochange.engine.contracts import VECTOR_FORMATS
from geochange.engine.errors import GeoChangeError, OptionError, PackageError
from geochange.engine.header import read_metadata
from geochange.engine.options import DetectOptions, number_or_word, spec
from geochange.engine.zoo import resolve_model, zoo_index
from geochange.qgis_plugin.engine_algorithm import tr
from geochange.qgis_plugin.worker_client import parameter_names

MODEL_FILTER = "GeoChange model package (*.safetensors);;All files (*)"
NO_ZOO_MODEL = "none: the model file below"

MODEL_HELP = {
    "ZOO_MODEL": "A model trained by the GeoChange project and shipped with the plugin (<code>geochange zoo</code> "
                 "lists what each is for, its inputs, data and test figures); <i>none</i> to use the model file "
                 "below.",
    "MODEL": "A GeoChange model file (<code>.safetensors</code>) holding the weights, the architecture and "
             "how inputs are scaled; its manifest is printed in the log when the algorithm runs (and by "
             "<i>Model information</i>). Pickled PyTorch checkpoints (<code>.pth</code>) are refused: "
             "convert them with <code>geochange import-weights</code>.",
}

# The numeric outputs of the algorithms that write change polygons.
POLYGON_OUTPUTS_HELP = {
    "POLYGON_COUNT": "How many change polygons were written.",
    "CHANGED_AREA_M2": "Their total area in square metres (in pixels for two rasters without a CRS, which are "
                       "paired pixel for pixel).",
}

ENGINE_NOTES = ("<p>The model runs in a separate Python process (see <i>Settings &gt; Options &gt; "
                "Processing &gt; Providers &gt; GeoChange</i>), so a crash of PyTorch or the GPU driver cannot "
                "take QGIS down; Cancel stops it. Nothing is written under the output names if the run "
                "fails or is cancelled.</p>")


def model_parameters() -> list:
    """A model file (``MODEL``), or a model of the zoo shipped with the plugin (``ZOO_MODEL``)."""
    # "All files" keeps other names acceptable, so that a wrong file (a .pth checkpoint...) gets the
    # engine's explanation instead of QGIS's bare "Incorrect parameter value".
    # Chosen by name, not position: saved models and batch runs keep their choice as the zoo grows.
    return [QgsProcessingParameterEnum("ZOO_MODEL", tr("Model from the zoo"), defaultValue=NO_ZOO_MODEL,
                                       options=[NO_ZOO_MODEL] + sorted(zoo_index()), usesStaticStrings=True),
            QgsProcessingParameterFile("MODEL", tr("Model file"), behavior=QgsProcessingParameterFile.File,
                                       fileFilter=tr(MODEL_FILTER), optional=True)]


def chosen_model(algorithm, parameters, context, required: bool = True) -> str | None:
    """The zoo model's name, else the model file; one of them is needed where ``required`` (else None)."""
    choice = algorithm.parameterAsEnumString(parameters, "ZOO_MODEL", context)
    if choice and choice != NO_ZOO_MODEL:
        return choice
    model = algorithm.parameterAsFile(parameters, "MODEL", context)
    if not model and required:
        raise QgsProcessingException(tr("Choose a model from the zoo (ZOO_MODEL) or give a model file (MODEL)"))
    return model or None


def model_manifest(algorithm, parameters, context) -> dict:
    """The chosen model's manifest (a router package's original model's), read without torch; a file that is no
    package raises the engine's ``PackageError``, no model at all ``chosen_model``'s refusal."""
    path = resolve_model(chosen_model(algorithm, parameters, context))
    manifest = read_metadata(path)
    original = manifest.get("original") if isinstance(manifest, dict) else None
    chosen = original.get("manifest", manifest) if isinstance(original, dict) else manifest
    if not isinstance(chosen, dict):  # the dialog's checks look its fields up; the engine would say the same
        raise PackageError(f"{path}: the manifest must be a JSON object, not {type(chosen).__name__}")
    return chosen


def band_numbers(algorithm, parameters, name: str, context) -> list[int] | None:
    """The 1-based bands of the band-list parameter ``name``, in their order; None where it is empty. Text is read
    as the engine's ``3,2,1`` (or QGIS's own ``3;2;1``): QGIS's parameterAsInts splits text at ';' only and reads
    "3,2,1" as [0]."""
    if algorithm.parameterDefinition(name).type() == "band" and not isinstance(parameters.get(name), str):
        return algorithm.parameterAsInts(parameters, name, context) or None  # a list: the dialog's, qgis_process's
    text = algorithm.parameterAsString(parameters, name, context).strip()  # text, or what an expression gives
    try:
        return band_list(text.replace(";", ",")) if text else None
    except OptionError as error:
        raise QgsProcessingException(f"{name}: {error}") from None


def option_parameter(name: str, **overrides) -> QgsProcessingParameterDefinition:
    """The parameter of the engine option ``name``; ``overrides`` (``default``, ``label``) where an algorithm
    differs."""
    option = spec(name)
    meta, default = option.metadata, overrides.get("default", option.default)
    label = tr(overrides.get("label", meta["label"]))
    parameter, kind, optional = meta["parameter"], meta["kind"], default is None
    if meta["words"]:  # a number or a word (the resolution's "model"): QGIS 3.22's number fields take no word
        made = QgsProcessingParameterString(parameter, label, defaultValue=default, optional=optional)
    elif kind in ("int", "float"):
        bounds = {key: meta[key] for key in ("minimum", "maximum") if meta[key] is not None}
        number = QgsProcessingParameterNumber.Integer if kind == "int" else QgsProcessingParameterNumber.Double
        made = QgsProcessingParameterNumber(parameter, label, number, defaultValue=default, optional=optional,
                                            **{"minValue" if k == "minimum" else "maxValue": v
                                               for k, v in bounds.items()})
    elif kind == "bool":
        made = QgsProcessingParameterBoolean(parameter, label, defaultValue=default)
    elif kind == "choice":
        made = QgsProcessingParameterEnum(parameter, label, options=list(meta["choices"]),
                                          defaultValue=meta["choices"].index(default))
    elif kind == "bands":
        made = QgsProcessingParameterBand(parameter, label, parentLayerParameterName=meta["parent"], optional=True,
                                          allowMultiple=True)
    elif kind == "crs":
        made = QgsProcessingParameterCrs(parameter, label, optional=True)
    elif kind == "vector":
        made = QgsProcessingParameterFeatureSource(parameter, label, [QgsProcessing.TypeVectorPolygon], optional=True)
    else:  # text: a free string (the device: the GPU index depends on the machine)
        made = QgsProcessingParameterString(parameter, label, defaultValue=default)
    if meta["advanced"]:
        made.setFlags(made.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    return made


def option_value(algorithm, parameters, context, name: str):
    """The engine's value of option ``name`` from its parameter (None where an optional one is empty)."""
    option = spec(name)
    parameter, kind = option.metadata["parameter"], option.metadata["kind"]
    if option.metadata["words"]:  # a saved number comes back as its text
        text = algorithm.parameterAsString(parameters, parameter, context).strip()
        return number_or_word(text, option.metadata["words"]) if text else option.default
    if kind in ("int", "float"):
        if option.default is None and parameters.get(parameter) in (None, ""):
            return None
        value = algorithm.parameterAsDouble(parameters, parameter, context)
        return int(value) if kind == "int" else value
    if kind == "bool":
        return algorithm.parameterAsBool(parameters, parameter, context)
    if kind == "choice":
        return option.metadata["choices"][algorithm.parameterAsEnum(parameters, parameter, context)]
    if kind == "bands":
        return band_numbers(algorithm, parameters, parameter, context)
    if kind == "crs":
        crs = algorithm.parameterAsCrs(parameters, parameter, context)
        if not crs.isValid():
            given = parameters.get(parameter)
            # A script's or qgis_process's text is not dropped unsaid; the modeler's "project CRS" of a project
            # without one is no CRS given.
            if isinstance(given, str) and given.strip() and given.strip().lower() != "projectcrs":
                raise QgsProcessingException(tr("{}: {} is no coordinate reference system QGIS knows").format(
                    parameter, given))
            return None
        # A user-defined CRS's id (USER:100000) is QGIS's own: GDAL is given its definition.
        authid = crs.authid()
        return authid if authid and not authid.startswith("USER:") else crs.toWkt(
            QgsCoordinateReferenceSystem.WKT_PREFERRED_GDAL)
    if kind == "vector":  # a file the engine reads (a memory or database layer is written to one first)
        if parameters.get(parameter) in (None, ""):
            return None
        # A feedback object is needed: QGIS 3.22 crashes exporting a layer without one.
        return vector_source(*algorithm.parameterAsCompatibleSourceLayerPathAndLayerName(
            parameters, parameter, context, list(VECTOR_FORMATS), "gpkg", QgsProcessingFeedback()),
            algorithm.parameterAsVectorLayer(parameters, parameter, context))
    return algorithm.parameterAsString(parameters, parameter, context).strip() or option.default


def options_problem(algorithm, parameters, context) -> str | None:
    """The engine's refusal of the algorithm's options (a scale of 0, an overlap not under the tile, the model's
    tile where none is given, an unknown CRS) in QGIS's names, or None: for the dialog's check, before any engine
    starts. Not the area of interest, which a memory layer's would write out to a file."""
    try:
        options = DetectOptions(**{name: option_value(algorithm, parameters, context, name)
                                   for name in algorithm.OPTIONS if spec(name).metadata["kind"] != "vector"})
    except (OptionError, QgsProcessingException) as error:
        return parameter_names(str(error), algorithm.parameter_flags())
    if "overlap" in algorithm.OPTIONS and options.tile is None:
        try:  # the package's tile, which the engine takes (a package recording none: the engine checks its default)
            tile = model_manifest(algorithm, parameters, context).get("tile")
        except (GeoChangeError, QgsProcessingException):  # no model, or none readable: the engine's to say
            return None
        if isinstance(tile, int) and options.overlap >= tile:
            return tr("{} must be under the model's tile of {} px ({} is empty), not {}").format(
                spec("overlap").metadata["parameter"], tile, spec("tile").metadata["parameter"], options.overlap)
    return None


def vector_source(path: str, layer: str, shown=None) -> str:
    """A vector file's layer as the engine takes it: ``FILE|layername=NAME``, or ``FILE`` for its only layer.
    ``shown``: the QGIS layer behind it, whose layer of the file QGIS 3.22 leaves unnamed where the layer names
    it by its index (``FILE|layerid=N``): GDAL would read the file's first layer instead."""
    if not layer and shown is not None:
        parts = QgsProviderRegistry.instance().decodeUri(shown.providerType(), shown.source())
        index = parts.get("layerId")
        if index not in (None, "") and os.path.normcase(os.path.abspath(parts.get("path", ""))) == \
                os.path.normcase(os.path.abspath(path)):
            layer = next((found.name() for found in QgsProviderRegistry.instance().querySublayers(path)
                          if found.providerKey() == shown.providerType() and found.layerNumber() == int(index)), "")
    return f"{path}|layername={layer}" if layer else path


def option_help(names) -> dict:
    """``{parameter: HTML help}`` of the engine options ``names``."""
    return {spec(name).metadata["parameter"]: html.escape(spec(name).metadata["help"], quote=False)
            for name in names}


def add_options(algorithm) -> None:
    """Add the parameters of the algorithm's engine options (``OPTIONS``), in their order."""
    for name in algorithm.OPTIONS:
        algorithm.addParameter(option_parameter(name))


def option_values(algorithm, parameters, context) -> dict:
    """The engine's keyword arguments of the algorithm's options."""
    return {name: option_value(algorithm, parameters, context, name) for name in algorithm.OPTIONS}
