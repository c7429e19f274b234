"""GeoChange: a QGIS plugin folder and the Python package ``geochange``.

QGIS calls ``classFactory`` at start-up; it must import nothing heavy (no torch), so the
provider module is imported only here, and it imports the engine lazily when an algorithm runs.
"""


def classFactory(iface):  # noqa: N802 (QGIS's name)
    from geochange.qgis_plugin.plugin import GeoChangePlugin

    return GeoChangePlugin(iface)
