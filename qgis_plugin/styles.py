"""How GeoChange's outputs look in QGIS: saved beside each output as its file's default style, and given to the
layers an algorithm loads into the project.

Probability: a pseudo-colour ramp over 0-1 whose legend says "change probability"; mask: changed pixels in
red, everything else transparent; an accuracy assessment's agreement: TP green, FP red, FN blue; polygons: a
red outline over a faint fill, labelled with their area at large scales, areas rounded in the attribute table;
the summary of many pairs: each footprint outlined in its status's colour.
A run's layers are kept together in the layer tree in the order the algorithm gives, and named after the part
of the input names that tells them apart.
"""
from __future__ import annotations

import re
from collections import deque
from pathlib import Path

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsColorRampShader,
    QgsDataProvider,
    QgsEditorWidgetSetup,
    QgsFillSymbol,
    QgsGradientColorRamp,
    QgsGradientStop,
    QgsLayerTree,
    QgsMapLayerLegendUtils,
    QgsMapLayerType,
    QgsPalettedRasterRenderer,
    QgsPalLayerSettings,
    QgsProcessingLayerPostProcessorInterface,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRasterTransparency,
    QgsRendererCategory,
    QgsSingleBandPseudoColorRenderer,
    QgsSingleSymbolRenderer,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtXml import QDomDocument

from geochange.engine.atomic import atomic_path, same_file
from geochange.engine.contracts import (ASSESS_FN, ASSESS_FP, ASSESS_TP, MASK_CHANGE, MASK_NO_CHANGE, PAIR_DONE,
                                        PAIR_FAILED, PAIR_PENDING, PAIR_SKIPPED, VECTOR_FORMATS)
from geochange.engine.errors import GeoChangeError
from geochange.qgis_plugin.engine_algorithm import GEOTIFF, tr

CHANGE_COLOUR = QColor(227, 26, 28)


def probability_ramp() -> QgsGradientColorRamp:
    """Low probabilities nearly transparent, so the imagery stays visible; high ones opaque red."""
    ramp = QgsGradientColorRamp(QColor(255, 255, 178, 0), QColor(189, 0, 38, 255))
    ramp.setStops([QgsGradientStop(0.25, QColor(254, 204, 92, 90)), QgsGradientStop(0.5, QColor(253, 141, 60, 170)),
                   QgsGradientStop(0.75, QColor(240, 59, 32, 220))])
    return ramp


def style_probability(layer, node=None) -> None:
    shader_function = QgsColorRampShader(0.0, 1.0, probability_ramp(), QgsColorRampShader.Interpolated)
    shader_function.classifyColorRamp(11, 1)
    shader = QgsRasterShader(0.0, 1.0)
    shader.setRasterShaderFunction(shader_function)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, shader)
    renderer.setClassificationMin(0.0)
    renderer.setClassificationMax(1.0)
    layer.setRenderer(renderer)
    # The legend's title, the band's name ("Band 1 (Gray)") unless the layer's tree node relabels it (a label of
    # the project's, not of the style: a layer opened later shows the band's name).
    if node is not None:
        QgsMapLayerLegendUtils.setLegendNodeUserLabel(node, 0, tr("change probability"))
    layer.triggerRepaint()


def style_mask(layer, node=None) -> None:
    classes = [QgsPalettedRasterRenderer.Class(MASK_CHANGE, CHANGE_COLOUR, "change")]
    renderer = QgsPalettedRasterRenderer(layer.dataProvider(), 1, classes)
    # Paletted renderers leave values outside their classes undrawn; the transparency entry states it
    # for "no change" so the style survives a user adding classes.
    transparency = QgsRasterTransparency()
    pixel = QgsRasterTransparency.TransparentSingleValuePixel()
    pixel.min = pixel.max = float(MASK_NO_CHANGE)
    pixel.percentTransparent = 100.0
    transparency.setTransparentSingleValuePixelList([pixel])
    renderer.setRasterTransparency(transparency)
    layer.setRenderer(renderer)
    layer.triggerRepaint()


# The agreement raster of *Assess change accuracy*: errors in strong colours, agreement on change in green.
AGREEMENT_CLASSES = ((ASSESS_TP, QColor(26, 152, 80), "true positive"), (ASSESS_FP, CHANGE_COLOUR, "false positive"),
                     (ASSESS_FN, QColor(33, 102, 172), "false negative"))


def style_agreement(layer, node=None) -> None:
    """TP, FP and FN in their colours; true negatives and pixels not assessed (no class) left undrawn."""
    classes = [QgsPalettedRasterRenderer.Class(value, colour, tr(label)) for value, colour, label in AGREEMENT_CLASSES]
    layer.setRenderer(QgsPalettedRasterRenderer(layer.dataProvider(), 1, classes))
    layer.triggerRepaint()


# Labels by area field: a pixel grid's polygons (inputs without a CRS) carry area_px instead of area_m2.
AREA_LABELS = {"area_m2": "format_number(\"area_m2\", 0) || ' m²'", "area_px": "format_number(\"area_px\", 0) || ' px'"}


# Labels from 1:10,000 on, where a label ("12,345 m²", some 12 mm: 120 m) spans about a hectare's polygon;
# further out the labels would outgrow most polygons and cover the changes.
LABEL_MINIMUM_SCALE = 10_000


def style_polygons(layer, node=None) -> None:
    symbol = QgsFillSymbol.createSimple({
        "color": f"{CHANGE_COLOUR.red()},{CHANGE_COLOUR.green()},{CHANGE_COLOUR.blue()},40",
        "outline_color": CHANGE_COLOUR.name(), "outline_width": "0.6", "outline_width_unit": "MM"})
    layer.setRenderer(QgsSingleSymbolRenderer(symbol))
    text = QgsTextFormat()
    text.setSize(8)
    text.setColor(QColor(40, 0, 0))
    buffer = QgsTextBufferSettings()
    buffer.setEnabled(True)
    buffer.setSize(0.8)
    buffer.setColor(QColor(255, 255, 255, 220))
    text.setBuffer(buffer)
    label = QgsPalLayerSettings()
    area = next((field for field in AREA_LABELS if layer.fields().indexOf(field) >= 0), "area_m2")
    label.fieldName = AREA_LABELS[area]
    label.isExpression = True
    label.setFormat(text)
    label.placement = QgsPalLayerSettings.OverPoint
    label.scaleVisibility = True
    label.minimumScale = LABEL_MINIMUM_SCALE  # the most zoomed-out scale that shows them
    layer.setLabeling(QgsVectorLayerSimpleLabeling(label))
    layer.setLabelsEnabled(True)
    # Whole units in the attribute table (the file keeps the computed areas).
    layer.setEditorWidgetSetup(layer.fields().indexOf(area), QgsEditorWidgetSetup("Range", {"Precision": 0}))
    layer.triggerRepaint()


# The summary of detect-many: each pair's footprint outlined in the colour of its status.
SUMMARY_COLOURS = ((PAIR_DONE, QColor(26, 152, 80)), (PAIR_SKIPPED, QColor(33, 102, 172)), (PAIR_FAILED, CHANGE_COLOUR),
                   (PAIR_PENDING, QColor(150, 150, 150)))


def style_summary(layer, node=None) -> None:
    categories = [QgsRendererCategory(status, QgsFillSymbol.createSimple({
        "color": "0,0,0,0", "outline_color": colour.name(), "outline_width": "0.8", "outline_width_unit": "MM"}),
        tr(status)) for status, colour in SUMMARY_COLOURS]
    layer.setRenderer(QgsCategorizedSymbolRenderer("status", categories))
    layer.triggerRepaint()


def stack(project, layer_ids: list[str]) -> None:
    """Put the layers' tree nodes in the given order (the first on top) in one group, where the top-most
    of them is."""
    root = project.layerTreeRoot()
    nodes = [root.findLayer(layer_id) for layer_id in layer_ids]
    parent = nodes[0].parent()
    children = [child.layerId() if QgsLayerTree.isLayer(child) else None for child in parent.children()]
    top = min(children.index(layer_id) for layer_id in layer_ids if layer_id in children)
    if children[top:top + len(layer_ids)] == layer_ids:
        return
    # A node moves as a copy: the project keeps a layer while the tree still shows it.
    parent.insertChildNodes(top, [node.clone() for node in nodes])
    for node in nodes:
        node.parent().removeChildNode(node)


class _Styler(QgsProcessingLayerPostProcessorInterface):
    """Styles a loaded output, then stacks its algorithm's outputs loaded so far (``loaded``: position in
    the algorithm's order -> layer id), since QGIS loads them in its own order, each at the tree's
    insertion point (3.22: in the order of their destinations' names)."""

    def __init__(self, style, position: int, loaded: dict):
        super().__init__()
        self._style, self._position, self._loaded = style, position, loaded

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 (QGIS's name)
        # A run into the outputs of one already loaded gives that layer again (QGIS 3.22), whose provider still
        # reads the file the engine's atomic rename replaced: it would show the earlier run. A raster layer keeps
        # the extent its first provider gave it: a new provider (the style is applied again below).
        if layer.type() == QgsMapLayerType.RasterLayer:
            layer.setDataSource(layer.source(), layer.name(), layer.providerType(),
                                QgsDataProvider.ProviderOptions())
        else:
            layer.dataProvider().reloadData()
        layer.triggerRepaint()
        project = layer.project()
        self._style(layer, project.layerTreeRoot().findLayer(layer.id()))
        self._loaded[self._position] = layer.id()
        stack(project, [self._loaded[position] for position in sorted(self._loaded)])


# QGIS owns the post-processors once set, but calls their Python override only while the wrapper lives.
_alive: deque = deque(maxlen=256)


def load_styled(context, outputs: list[tuple[str, str, object]]) -> None:
    """Give each output ``(path, layer name, style)`` that is to be loaded into a project when the
    algorithm completes (the toolbox's "Open output file", runAndLoadResults) its name and style
    (``style(layer, tree node)``), and keep the outputs together in the layer tree, the first on top."""
    loaded: dict = {}
    for position, (path, name, style) in enumerate(outputs):
        if not context.willLoadLayerOnCompletion(path):
            continue
        details = context.layerToLoadOnCompletionDetails(path)
        details.name = name
        details.forceName = True  # keep this name even when the user prefers file names for layers
        styler = _Styler(style, position, loaded)
        _alive.append(styler)
        details.setPostProcessor(styler)


# QGIS finds a file's default style by the file's base name alone: a file of the same base name in one of these
# formats (another output of the run, an input) would open with the output's style too.
LAYER_SUFFIXES = (*GEOTIFF, *(f".{suffix}" for suffix in VECTOR_FORMATS))


def save_default_style(uri: str, style) -> None:
    """Save ``style`` for the output ``uri`` (a file, or ``FILE|layername=NAME``) as the style QGIS opens the file
    with wherever it is opened later (a run through qgis_process, a Processing model, outputs not loaded):
    ``<file's base name>.qml`` beside it, where QGIS 3.22 looks for a layer's default style (``styleURI``) for a
    GeoTIFF, a GeoPackage's layer, a shapefile and a GeoJSON file alike (a default style in a GeoPackage's own
    layer_styles table would come first: GeoChange writes GeoPackages without one). Written whole under a
    temporary name, then renamed."""
    path = Path(QgsProviderRegistry.instance().decodeUri("ogr", uri)["path"])
    # The style the file has from an earlier run is not loaded: it is about to be replaced.
    if path.suffix.lower() in GEOTIFF:
        layer = QgsRasterLayer(uri, path.stem, "gdal", QgsRasterLayer.LayerOptions(loadDefaultStyle=False))
    else:
        layer = QgsVectorLayer(uri, path.stem, "ogr", QgsVectorLayer.LayerOptions(loadDefaultStyle=False))
    if not layer.isValid():
        raise GeoChangeError(tr("QGIS cannot open it as a layer"))
    target = Path(layer.styleURI())
    shared = [other.name for other in map(target.with_suffix, LAYER_SUFFIXES)
              if other.exists() and not same_file(other, path)]
    if shared:
        raise GeoChangeError(tr("its style file {} would style {} too; give the output a base name of its own")
                             .format(target, ", ".join(shared)))
    style(layer)
    document = QDomDocument()
    problem = layer.exportNamedStyle(document)
    if problem:
        raise GeoChangeError(problem)
    with atomic_path(target) as temporary:
        temporary.write_text(document.toString(2), encoding="utf-8")


def style_outputs(context, feedback, outputs: list[tuple[str, str, object]]) -> None:
    """Style each output ``(path, layer name, style)`` that the engine has just written wherever it is opened:
    its style saved as its file's default style (``save_default_style``), and its layer named and styled when the
    algorithm loads it into the project (``load_styled``). An output whose style cannot be saved is still the
    run's result: the log says why it will open unstyled."""
    for uri, _, style in outputs:
        try:
            save_default_style(uri, style)
        except GeoChangeError as error:
            feedback.pushWarning(tr("{}: no style saved beside it, so QGIS will open it unstyled: {}")
                                 .format(uri, error))
    load_styled(context, outputs)


# Shared start and end of two input names, in characters, from which a layer's name shows the rest.
SHARED_NAME = 8


def pair_name(pre: str, post: str) -> str:
    """"PRE vs POST", or, when the names share a long start or end (a product, a tile), what tells them
    apart first and the shared part after: "06_01 vs 08_15 (S2_2019_…_T33UXP)". Names are cut between
    words (runs of letters and digits) only."""
    a, b = (re.split(r"([\W_]+)", name) for name in (pre, post))  # words at even indices, separators between
    limit = min(len(a), len(b)) - 1  # leave each name a word of its own
    head = 0
    while head < limit and a[head] == b[head]:
        head += 1
    head -= head % 2  # the shared start ends with a separator
    tail = 0
    while head + tail < limit and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    tail -= tail % 2
    start, end = "".join(a[:head]), "".join(a[len(a) - tail:])
    own_a, own_b = "".join(a[head:len(a) - tail]), "".join(b[head:len(b) - tail])
    if pre == post or len(start + end) < SHARED_NAME or not (own_a and own_b):
        return tr("{} vs {}").format(pre, post)
    return tr("{} vs {} ({}…{})").format(own_a, own_b, start, end)
