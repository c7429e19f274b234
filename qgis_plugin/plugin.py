"""The object QGIS holds for the plugin: it adds the Processing provider and removes it on unload."""
from __future__ import annotations

from qgis.core import QgsApplication

from geochange.qgis_plugin.provider import GeoChangeProvider


class GeoChangePlugin:
    """No menus or toolbars: everything is a Processing algorithm (toolbox, models, qgis_process)."""

    def __init__(self, iface):
        self.iface = iface
        self.provider: GeoChangeProvider | None = None

    def initProcessing(self):  # noqa: N802 (QGIS's name; qgis_process calls only this)
        self.provider = GeoChangeProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):  # noqa: N802 (QGIS's name)
        self.initProcessing()

    def unload(self):
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
