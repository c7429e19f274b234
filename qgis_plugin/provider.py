"""The Processing provider ``geochange``: the group "GeoChange" in the toolbox."""
from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from geochange.engine.contracts import VECTOR_FORMATS
from geochange.qgis_plugin.assess_algorithm import AssessAccuracyAlgorithm
from geochange.qgis_plugin.detect_algorithm import DetectChangesAlgorithm
from geochange.qgis_plugin.evaluate_algorithm import EvaluateModelAlgorithm
from geochange.qgis_plugin.info_algorithm import ModelInfoAlgorithm
from geochange.qgis_plugin.many_algorithm import SCHEDULER_SETTING, DetectManyPairsAlgorithm
from geochange.qgis_plugin.setup_algorithm import SetupEngineAlgorithm
from geochange.qgis_plugin.train_algorithm import TrainModelAlgorithm
from geochange.qgis_plugin.vectorize_algorithm import VectorizeChangesAlgorithm
from geochange.qgis_plugin.worker_client import PLUGIN_ROOT, PYTHON_ENV, PYTHON_SETTING, SETUP_ALGORITHM

ALGORITHMS = (DetectChangesAlgorithm, DetectManyPairsAlgorithm, VectorizeChangesAlgorithm, TrainModelAlgorithm,
              EvaluateModelAlgorithm, ModelInfoAlgorithm, AssessAccuracyAlgorithm, SetupEngineAlgorithm)


def _processing_config():
    """Processing's settings registry (the Options dialog page), absent where Processing's Python
    plugin is not loaded; the interpreter setting is then read from QgsSettings alone."""
    try:
        from processing.core.ProcessingConfig import ProcessingConfig, Setting
    except ImportError:
        return None, None
    return ProcessingConfig, Setting


class GeoChangeProvider(QgsProcessingProvider):
    def id(self):
        return "geochange"

    def name(self):
        return "GeoChange"

    def longName(self):  # noqa: N802 (QGIS's name)
        return "GeoChange change detection"

    def icon(self):
        return QIcon(str(PLUGIN_ROOT / "icon.png"))

    def load(self):
        config, setting = _processing_config()
        if config is not None:
            config.settingIcons[self.name()] = self.icon()
            config.addSetting(setting(
                self.name(), PYTHON_SETTING,
                self.tr("Python interpreter for the engine (set by '{}'; empty: ${}, else the .venv beside the "
                        "plugin, else QGIS's Python)").format(SETUP_ALGORITHM, PYTHON_ENV), "",
                valuetype=setting.FILE))
            config.addSetting(setting(
                self.name(), SCHEDULER_SETTING,
                self.tr("Dask scheduler for Detect changes in many pairs (tcp://HOST:8786; empty: a cluster "
                        "on this computer)"), ""))
            config.readSettings()
        self.refreshAlgorithms()
        return True

    def unload(self):
        config, _ = _processing_config()
        for name in (PYTHON_SETTING, SCHEDULER_SETTING):
            if config is not None and name in config.settings:
                config.removeSetting(name)

    def loadAlgorithms(self):  # noqa: N802 (QGIS's name)
        for algorithm in ALGORITHMS:
            self.addAlgorithm(algorithm())

    # The engine writes GeoTIFF rasters and GeoPackage, shapefile or GeoJSON vectors only; offering other formats
    # in the output widgets would produce files with the wrong content for their extension.
    def supportedOutputRasterLayerExtensions(self):  # noqa: N802 (QGIS's name)
        return ["tif"]

    def defaultRasterFileExtension(self):  # noqa: N802 (QGIS's name)
        return "tif"

    def supportedOutputVectorLayerExtensions(self):  # noqa: N802 (QGIS's name)
        return list(VECTOR_FORMATS)

    def defaultVectorFileExtension(self, hasGeometry=True):  # noqa: N802,N803 (QGIS's names)
        return "gpkg"
