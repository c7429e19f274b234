"""Shared fixtures: the real data beside the project, and packages made from it once per session."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GEOCHANGE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (set GEOCHANGE_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tinycd_package(shared_data, tmp_path_factory) -> Path:
    """The TinyCD authors' LEVIR weights imported into a GeoChange package."""
    from geochange.engine.importers import import_weights

    out = tmp_path_factory.mktemp("packages") / "tinycd_levir.safetensors"
    import_weights("tinycd", shared_data / "weights" / "tinycd_levir_official.pth", out)
    return out


# --- QGIS ------------------------------------------------------------------------------------------
# QGIS loads a plugin by its folder name, so the tests expose the repository as ``geochange`` in a
# plugins folder of their own, and run QGIS with a throw-away profile so the user's is never read.

QGIS_PROCESSING_PLUGINS = "/usr/share/qgis/python/plugins"  # where Debian puts ``processing``
# Debian's ``qgis_process`` wrapper passes an option 3.22 rejects; its binary works.
QGIS_PROCESS = os.environ.get("GEOCHANGE_QGIS_PROCESS", "/usr/bin/qgis_process.bin")


@pytest.fixture(scope="session")
def qgis_plugins_dir(tmp_path_factory) -> Path:
    """A QGIS plugins folder holding the repository under the name ``geochange``."""
    folder = tmp_path_factory.mktemp("qgis_plugins")
    (folder / "geochange").symlink_to(REPO, target_is_directory=True)
    return folder


@pytest.fixture(scope="session")
def qgis_app(tmp_path_factory):
    """A headless QgsApplication with Processing initialised, shared by the whole session."""
    pytest.importorskip("qgis.core", reason="QGIS Python bindings are not installed")
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    # QGIS computes statistics of every raster layer it opens and GDAL would save them beside the
    # shared, read-only test data as .aux.xml files.
    os.environ["GDAL_PAM_ENABLED"] = "NO"
    from qgis.core import QgsApplication

    app = QgsApplication([], False, str(tmp_path_factory.mktemp("qgis_profile")))
    app.initQgis()
    if QGIS_PROCESSING_PLUGINS not in sys.path:
        sys.path.append(QGIS_PROCESSING_PLUGINS)
    from processing.core.Processing import Processing

    Processing.initialize()
    yield app
    app.exitQgis()


def qgis_process_environment(home: Path, plugins_dir: Path) -> dict:
    """What ``qgis_process`` needs to run the plugin: no display, a private profile, the plugins
    folder, and this interpreter's packages (torch...) since it embeds the system Python."""
    runtime = home / "runtime"
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update({
        "QT_QPA_PLATFORM": "offscreen",
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "data"),  # the QGIS profile lives here
        "XDG_CONFIG_HOME": str(home / "config"),
        "XDG_CACHE_HOME": str(home / "cache"),
        "XDG_RUNTIME_DIR": str(runtime),
        "QGIS_PLUGINPATH": str(plugins_dir),
        "GDAL_PAM_ENABLED": "NO",  # no .aux.xml statistics beside the input rasters
        "PYTHONPATH": os.pathsep.join(
            p for p in (sysconfig.get_paths()["purelib"], os.environ.get("PYTHONPATH")) if p),
    })
    return env


@pytest.fixture(scope="session")
def qgis_process(qgis_plugins_dir, tmp_path_factory):
    """Run ``qgis_process`` with the plugin enabled: ``qgis_process("run", alg, "--", "A=1")``."""
    if not os.access(QGIS_PROCESS, os.X_OK):
        pytest.skip(f"{QGIS_PROCESS} not found (set GEOCHANGE_QGIS_PROCESS)")
    env = qgis_process_environment(tmp_path_factory.mktemp("qgis_home"), qgis_plugins_dir)

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([QGIS_PROCESS, *args], env=env, capture_output=True, text=True,
                              timeout=timeout)

    enabled = run("plugins", "enable", "geochange", timeout=120)
    assert enabled.returncode == 0, enabled.stdout + enabled.stderr
    return run
