"""What every GeoChange algorithm shares: a help text built from its own parameters, the engine
process, and the file paths behind layer and destination parameters."""
from __future__ import annotations

import html
import os
from pathlib import Path

from qgis.core import (
    QgsCoordinateTransform,
    QgsCsException,
    QgsDataSourceUri,
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterNumber,
    QgsProviderRegistry,
    QgsRectangle,
)
from qgis.PyQt.QtCore import QCoreApplication

from geochange.engine.contracts import POLYGON_LAYER, VECTOR_FORMATS
from geochange.engine.options import flag, spec
from geochange.qgis_plugin import worker_client


# The raster outputs' format, by its suffixes.
GEOTIFF = (".tif", ".tiff")


def tr(text: str) -> str:
    return QCoreApplication.translate("GeoChange", text)


class EngineAlgorithm(QgsProcessingAlgorithm):
    """Subclasses set the texts below; the help lists every parameter and output from its definition,
    so a parameter cannot be added without being explained (``help_text`` raises on a missing one)."""

    NAME = ""
    DISPLAY_NAME = ""
    GROUP = ""
    SUMMARY = ""  # HTML: what the algorithm does
    PARAMETER_HELP: dict = {}  # parameter or output name -> HTML explanation
    NOTES = ""  # HTML after the lists
    # The engine's run options (``engine.options``) the algorithm offers as parameters
    # (``parameters.add_options``, read back by ``parameters.option_values``). An engine message naming an
    # option as the command line does (``--pre-bands``) names its parameter instead.
    OPTIONS: list = []
    FLAGS: dict = {}  # the same for the algorithm's other engine arguments: {"--ignore-value": "IGNORE_VALUE"}

    GROUPS = {"detection": "Change detection", "models": "Models", "setup": "Set-up"}

    def name(self):
        return self.NAME

    def displayName(self):  # noqa: N802 (QGIS's name)
        return tr(self.DISPLAY_NAME)

    def groupId(self):  # noqa: N802 (QGIS's name)
        return self.GROUP

    def group(self):
        return tr(self.GROUPS[self.GROUP])

    def createInstance(self):  # noqa: N802 (QGIS's name)
        return type(self)()

    def shortHelpString(self):  # noqa: N802 (QGIS's name)
        return help_text(self)

    def notes(self) -> str:
        """HTML after the parameter lists."""
        return self.NOTES

    def run_engine(self, task: str, args: dict, feedback, outputs=()) -> dict:
        return worker_client.run_task(task, args, feedback or QgsProcessingFeedback(), outputs,
                                      self.parameter_flags())

    def parameter_flags(self) -> dict:
        """How the engine's messages name the algorithm's parameters: ``{"--pre-bands": "PRE_BANDS"}``."""
        return {**{flag(name): spec(name).metadata["parameter"] for name in self.OPTIONS}, **self.FLAGS}

    def raster_path(self, parameters, name, context) -> str:
        """The file behind a raster layer parameter; the engine reads files through GDAL itself."""
        layer = self.parameterAsRasterLayer(parameters, name, context)
        if layer is None:
            raise QgsProcessingException(self.invalidRasterError(parameters, name))
        return raster_file(layer, name)

    def layer_name(self, parameters, name, context) -> str:
        layer = self.parameterAsRasterLayer(parameters, name, context)
        return layer.name() if layer is not None else name.lower()

    def output_path(self, parameters, name, context, suffixes) -> str:
        definition = self.parameterDefinition(name)
        if definition.type() in ("rasterDestination", "vectorDestination"):
            path = self.parameterAsOutputLayer(parameters, name, context)
        else:
            path = self.parameterAsFileOutput(parameters, name, context)
        return require_suffix(name, path, suffixes)

    def polygon_output(self, parameters, name, context) -> tuple[str, str, str]:
        """The file of a polygon output, its layer and the layer's URI (the file itself where no layer is named).
        Accepted: a GeoPackage (layer ``changes``), ``out.gpkg|layername=NAME``, what the output widget's *Save to
        GeoPackage…* gives, ``ogr:dbname='out.gpkg' table="NAME"``, a shapefile or a GeoJSON file (one layer, the
        file's own)."""
        destination = self.parameterAsOutputLayer(parameters, name, context)
        if destination.startswith("ogr:"):
            uri = QgsDataSourceUri(destination[len("ogr:"):])
            path, layer = uri.database(), uri.table()
        else:
            parts = QgsProviderRegistry.instance().decodeUri("ogr", destination)
            path, layer = parts["path"], parts["layerName"]
        path = require_suffix(name, path, tuple(f".{suffix}" for suffix in VECTOR_FORMATS))
        if Path(path).suffix.lower() != ".gpkg":
            layer = ""  # the file's one layer
        uri = QgsProviderRegistry.instance().encodeUri("ogr", {"path": path, "layerName": layer}) if layer else path
        # QGIS would add a named layer to the file; the engine writes the whole file, which would delete the rest.
        if layer and os.path.exists(path):
            others = sorted({s.name() for s in QgsProviderRegistry.instance().querySublayers(path)} - {layer})
            if others:
                raise QgsProcessingException(tr("{}: '{}' holds other layers ({}), which GeoChange would delete: "
                                                "it writes the whole GeoPackage. Choose a new file")
                                             .format(name, path, ", ".join(others)))
        if uri != destination and context.willLoadLayerOnCompletion(destination):
            # QGIS loads an output by its destination, which it cannot open in the ogr: form.
            loading = context.layersToLoadOnCompletion()
            loading[uri] = loading.pop(destination)
            context.setLayersToLoadOnCompletion(loading)
        return path, layer or POLYGON_LAYER, uri

    def optional_double(self, parameters, name, context) -> float | None:
        value = parameters.get(name)
        return None if value is None or value == "" else self.parameterAsDouble(parameters, name, context)


def require_suffix(name: str, path: str, suffixes) -> str:
    """``path``, refused unless it ends in one of ``suffixes``."""
    if Path(path).suffix.lower() not in suffixes:
        raise QgsProcessingException(tr("{}: '{}' must end in {} (the format GeoChange writes)")
                                     .format(name, path, " or ".join(suffixes)))
    return path


def layer_file(layer) -> str | None:
    """The raster file a GDAL layer shows whole, which the engine can read (None for a layer of another provider,
    and for a GeoPackage's raster table, a file in an archive or one opened with options: the engine would read the
    file itself, or not find it)."""
    if layer.providerType() != "gdal":
        return None
    parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
    if parts.get("layerName") or parts.get("vsiPrefix") or parts.get("openOptions"):
        return None
    return parts["path"]


def raster_file(layer, name: str) -> str:
    """``layer_file``, or the reason the engine cannot read the layer."""
    path = layer_file(layer)
    if path is not None:
        return path
    if layer.providerType() != "gdal":
        raise QgsProcessingException(tr("{}: '{}' is a {} layer; GeoChange reads raster files only")
                                     .format(name, layer.name(), layer.providerType()))
    path = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())["path"]  # the source may hold a token
    raise QgsProcessingException(tr("{}: '{}' is part of a file ({}): a GeoPackage's raster table, a file inside an "
                                    "archive or one opened with options; GeoChange reads whole raster files: save it "
                                    "as a GeoTIFF first (Raster > Conversion > Translate)")
                                 .format(name, layer.name(), path))


def same_raster(a, b) -> bool:
    """Whether two raster layers show one raster: the same layer, or two layers of one file."""
    if a.id() == b.id():
        return True
    paths = [layer_file(layer) for layer in (a, b)]
    if not all(paths):  # two tables of one GeoPackage are two rasters
        return a.source() == b.source()
    try:
        return os.path.samefile(*paths)
    except OSError:  # not files on this system (a /vsi path...): their names decide
        return paths[0] == paths[1]


def overlap(a, b, context) -> bool:
    """Whether two raster layers' extents meet (b's taken into a's CRS); true where that cannot be told
    (a layer without a CRS, a failed transform): the engine then decides."""
    if not (a.crs().isValid() and b.crs().isValid()):
        return True
    try:
        extent = QgsCoordinateTransform(b.crs(), a.crs(), context.transformContext()).transformBoundingBox(b.extent())
    except QgsCsException:
        return True
    # In degrees, a turn of the Earth apart may be one place across the antimeridian: the engine lines them up.
    turns = (-360, 0, 360) if a.crs().isGeographic() else (0,)
    return any(QgsRectangle(extent.xMinimum() + turn, extent.yMinimum(), extent.xMaximum() + turn,
                            extent.yMaximum()).intersects(a.extent()) for turn in turns)


def _default_text(parameter) -> str:
    default = parameter.defaultValue()
    if isinstance(parameter, QgsProcessingParameterEnum):
        options = parameter.options()
        text = tr("One of: {}.").format(", ".join(f"<i>{html.escape(o)}</i>" for o in options))
        if default is not None:  # an index, or the option itself where the enum uses static strings
            shown = default if parameter.usesStaticStrings() else options[int(default)]
            text += " " + tr("Default: <i>{}</i>.").format(html.escape(shown))
        return text
    if default in (None, "") or parameter.isDestination():
        return ""
    if isinstance(parameter, QgsProcessingParameterNumber):
        default = f"{default:g}"
    return tr("Default: <code>{}</code>.").format(html.escape(str(default)))


def help_text(algorithm: EngineAlgorithm) -> str:
    """The algorithm's summary, then each input parameter and each output with its explanation."""
    def entry(name, description, extra="", output=False):
        if name not in algorithm.PARAMETER_HELP:
            raise KeyError(f"{algorithm.NAME}: no help for {name}")
        default = "" if output else _default_text_for(algorithm, name)
        return (f"<dt><b>{html.escape(description, quote=False)}</b> <code>{name}</code>{extra}</dt>"
                f"<dd>{tr(algorithm.PARAMETER_HELP[name])} {default}</dd>")

    inputs = [p for p in algorithm.parameterDefinitions() if not p.isDestination()]
    parts = [tr(algorithm.SUMMARY), "<h3>" + tr("Parameters") + "</h3>", "<dl>"]
    for p in inputs:
        optional = bool(p.flags() & QgsProcessingParameterDefinition.FlagOptional)
        parts.append(entry(p.name(), p.description(), tr(" (optional)") if optional else ""))
    parts += ["</dl>", "<h3>" + tr("Outputs") + "</h3>", "<dl>"]
    parts += [entry(o.name(), o.description(), output=True) for o in algorithm.outputDefinitions()]
    parts.append("</dl>")
    if algorithm.notes():
        parts.append(tr(algorithm.notes()))
    return "\n".join(parts)


def _default_text_for(algorithm, name) -> str:
    parameter = algorithm.parameterDefinition(name)
    return _default_text(parameter) if parameter is not None else ""
