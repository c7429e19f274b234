"""How GeoChange's outputs look once loaded into a project, and the hook that applies it.

Probability: a pseudo-colour ramp over 0-1; mask: changed pixels in red, everything else transparent;
polygons: a red outline over a faint fill, labelled with their area.
"""
from __future__ import annotations

from collections import deque

from qgis.core import (
    QgsColorRampShader,
    QgsFillSymbol,
    QgsGradientColorRamp,
    QgsGradientStop,
    QgsPalettedRasterRenderer,
    QgsPalLayerSettings,
    QgsProcessingLayerPostProcessorInterface,
    QgsRasterShader,
    QgsRasterTransparency,
    QgsSingleBandPseudoColorRenderer,
    QgsSingleSymbolRenderer,
    QgsTextBufferSettings,
    QgsTextFormat,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtGui import QColor

from geochange.engine.contracts import MASK_CHANGE, MASK_NO_CHANGE

CHANGE_COLOUR = QColor(227, 26, 28)


def probability_ramp() -> QgsGradientColorRamp:
    """Low probabilities nearly transparent, so the imagery stays visible; high ones opaque red."""
    ramp = QgsGradientColorRamp(QColor(255, 255, 178, 0), QColor(189, 0, 38, 255))
    ramp.setStops([QgsGradientStop(0.25, QColor(254, 204, 92, 90)), QgsGradientStop(0.5, QColor(253, 141, 60, 170)),
                   QgsGradientStop(0.75, QColor(240, 59, 32, 220))])
    return ramp


def style_probability(layer) -> None:
    shader_function = QgsColorRampShader(0.0, 1.0, probability_ramp(), QgsColorRampShader.Interpolated)
    shader_function.classifyColorRamp(11, 1)
    shader = QgsRasterShader(0.0, 1.0)
    shader.setRasterShaderFunction(shader_function)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, shader)
    renderer.setClassificationMin(0.0)
    renderer.setClassificationMax(1.0)
    layer.setRenderer(renderer)
    layer.triggerRepaint()


def style_mask(layer) -> None:
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


# Labels by area field: a pixel grid's polygons (inputs without a CRS) carry area_px instead of area_m2.
AREA_LABELS = {"area_m2": "format_number(\"area_m2\", 0) || ' m²'", "area_px": "format_number(\"area_px\", 0) || ' px'"}


def style_polygons(layer) -> None:
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
    label.fieldName = next((text for field, text in AREA_LABELS.items() if layer.fields().indexOf(field) >= 0),
                           AREA_LABELS["area_m2"])
    label.isExpression = True
    label.setFormat(text)
    label.placement = QgsPalLayerSettings.OverPoint
    layer.setLabeling(QgsVectorLayerSimpleLabeling(label))
    layer.setLabelsEnabled(True)
    layer.triggerRepaint()


class _Styler(QgsProcessingLayerPostProcessorInterface):
    def __init__(self, style):
        super().__init__()
        self._style = style

    def postProcessLayer(self, layer, context, feedback):  # noqa: N802 (QGIS's name)
        self._style(layer)


# QGIS owns the post-processors once set, but calls their Python override only while the wrapper lives.
_alive: deque = deque(maxlen=256)


def load_styled(context, path: str, name: str, style) -> None:
    """Give the output ``path`` the layer name ``name`` and ``style``, if it is to be loaded into a
    project when the algorithm completes (the toolbox's "Open output file", runAndLoadResults)."""
    if not context.willLoadLayerOnCompletion(path):
        return
    details = context.layerToLoadOnCompletionDetails(path)
    details.name = name
    details.forceName = True  # keep this name even when the user prefers file names for layers
    styler = _Styler(style)
    _alive.append(styler)
    details.setPostProcessor(styler)
