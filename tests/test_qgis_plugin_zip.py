"""``make plugin``: the zip QGIS's "Install from ZIP" takes, installed into a fresh profile and loaded
by QGIS's plugin loader in QGIS's own Python (which has no torch), then used."""
from __future__ import annotations

import configparser
import json
import re
import subprocess
import zipfile

import pytest

from conftest import REPO

pytest.importorskip("qgis.core", reason="QGIS Python bindings are not installed")

QGIS_PYTHON_PATHS = ["/usr/share/qgis/python", "/usr/share/qgis/python/plugins"]  # Debian's layout
METADATA_KEYS = {"name", "qgisMinimumVersion", "version", "description", "about", "author", "email", "repository",
                 "tracker", "tags", "icon", "experimental", "hasProcessingProvider"}


def test_the_zip_holds_one_plugin_folder_of_runtime_files(plugin_zip):
    with zipfile.ZipFile(plugin_zip) as zf:
        names = zf.namelist()
        metadata = configparser.ConfigParser()
        metadata.optionxform = str  # keys are case-sensitive for QGIS (qgisMinimumVersion)
        metadata.read_string(zf.read("geochange/metadata.txt").decode("utf-8"))
        icon = zf.read("geochange/" + metadata["general"]["icon"])
    assert {n.split("/")[0] for n in names} == {"geochange"}
    for needed in ("__init__.py", "LICENSE", "metadata.txt", "requirements.txt", "qgis_plugin/provider.py",
                   "qgis_plugin/worker_client.py", "engine/worker.py", "engine/detect.py", "engine/models/tinycd.py",
                   "trainer/__init__.py"):
        assert f"geochange/{needed}" in names
    for name in names:  # no tests, venv, benchmarks, docs, scripts, caches or packaging leftovers
        assert not re.search(r"(^|/)(tests|\.venv|bench|docs|scripts|build|dist|__pycache__|demo_out)/|\.pyc$",
                             name), name
    general = metadata["general"]
    assert METADATA_KEYS <= set(general)
    assert general["qgisMinimumVersion"] == "3.22" and general["hasProcessingProvider"] == "yes"
    assert plugin_zip.name == f"geochange-{general['version']}.zip"
    assert icon.startswith(b"\x89PNG")


def test_qt_is_imported_only_through_qgis_pyqt():
    """QGIS 4 (Qt 6) keeps ``qgis.PyQt`` as the one way to reach Qt."""
    for path in (REPO / "qgis_plugin").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(from|import)\s+(PyQt5|PyQt6|PySide\d?|sip)\b", text, re.M), path


INSTALL_AND_RUN = """
import json, os, sys, zipfile
os.environ["QT_QPA_PLATFORM"] = "offscreen"
os.environ["GDAL_PAM_ENABLED"] = "NO"
sys.path += {qgis_python_paths!r}
from qgis.core import QgsApplication, QgsProcessingFeedback, QgsSettings
app = QgsApplication([], False, {profile!r})
app.initQgis()
from processing.core.Processing import Processing
Processing.initialize()
import qgis.utils
from pyplugin_installer.installer_data import plugins
from pyplugin_installer.unzip import unzip

# What "Install from ZIP" does: the plugin's name is the folder of the first metadata.txt, the zip is
# unpacked into the profile's plugin folder, the plugin is loaded and started.
plugins_dir = os.path.join(QgsApplication.qgisSettingsDirPath(), "python", "plugins")
os.makedirs(plugins_dir, exist_ok=True)
with zipfile.ZipFile({zip!r}) as zf:
    name = os.path.split(sorted(f for f in zf.namelist() if f.endswith("metadata.txt"))[0])[0]
unzip({zip!r}, plugins_dir)
qgis.utils.plugin_paths = [plugins_dir]
qgis.utils.home_plugin_path = plugins_dir
sys.path.insert(0, plugins_dir)
qgis.utils.updateAvailablePlugins()
installed = plugins.getInstalledPlugin(name, os.path.join(plugins_dir, name), False)
print("PLUGIN", json.dumps({{"name": name, "available": name in qgis.utils.available_plugins,
                            "error": installed["error"],
                            "title": installed["name"], "experimental": installed["experimental"]}}))
print("STARTED", qgis.utils.loadPlugin(name) and qgis.utils.startPlugin(name))
provider = QgsApplication.processingRegistry().providerById("geochange")
print("ALGORITHMS", sorted(a.id() for a in provider.algorithms()))
print("ENGINE_IMPORTED", "torch" in sys.modules)

# The user points GeoChange at a Python with torch (Settings > Options > Processing > GeoChange).
QgsSettings().setValue("Processing/Configuration/GEOCHANGE_PYTHON", {python!r})
class Log(QgsProcessingFeedback):
    def pushInfo(self, text):
        print("INFO", text)
import processing
results = processing.run("geochange:modelinfo", {{"MODEL": {model!r}, "OUTPUT": {table!r}}}, feedback=Log())
print("RESULTS", json.dumps(results))
print("PLUGIN_FILE", sys.modules["geochange"].__file__)
"""


def test_zip_installs_into_a_fresh_profile_and_runs(plugin_zip, tinycd_package, tmp_path):
    profile = tmp_path / "profile"
    script = INSTALL_AND_RUN.format(qgis_python_paths=QGIS_PYTHON_PATHS, profile=str(profile), zip=str(plugin_zip),
                                    python=str(REPO / ".venv" / "bin" / "python"), model=str(tinycd_package),
                                    table=str(tmp_path / "info.csv"))
    done = subprocess.run(["/usr/bin/python3", "-c", script], capture_output=True, text=True, timeout=180,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stdout + done.stderr
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stdout.splitlines() if " " in line}
    plugin = json.loads(lines["PLUGIN"])
    # The Plugin Manager's own reading of the metadata: no error (not "broken", not "incompatible").
    assert plugin == {"name": "geochange", "available": True, "error": "", "title": "GeoChange", "experimental": True}
    assert lines["STARTED"] == "True"
    assert "geochange:detectchanges" in lines["ALGORITHMS"] and "geochange:modelinfo" in lines["ALGORITHMS"]
    assert lines["ENGINE_IMPORTED"] == "False"
    assert json.loads(lines["RESULTS"])["ARCHITECTURE"] == "tinycd"
    installed = profile / "python" / "plugins" / "geochange"
    assert lines["PLUGIN_FILE"] == str(installed / "__init__.py")
    # The engine that ran is the installed copy, under the configured interpreter.
    engine_line = next(line for line in done.stdout.splitlines() if line.startswith("INFO GeoChange engine"))
    assert str(installed) in engine_line and str(REPO / ".venv" / "bin" / "python") in engine_line
    assert "tinycd" in (tmp_path / "info.csv").read_text()
