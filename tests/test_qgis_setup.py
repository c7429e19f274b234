"""The first run after "Install from ZIP": QGIS's own interpreter found whatever PATH holds, the
missing-dependency error pointing to *Set up the GeoChange engine*, that algorithm making the engine's
environment with real pip installs, then *Detect changes* running in it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("qgis.core", reason="QGIS Python bindings are not installed")
from qgis.core import QgsProcessingException, QgsProcessingFeedback, QgsSettings  # noqa: E402

from conftest import QGIS_PROCESS, qgis_process_environment, run_algorithm  # noqa: E402

# A pyenv shim with no Python behind it: the first "python3" on PATH, which an embedded Python (QGIS) takes
# for its sys.executable.
SHIM = "#!/bin/sh\necho 'pyenv: python3: command not found' >&2\nexit 127\n"


@pytest.fixture
def shim(tmp_path) -> Path:
    folder = tmp_path / "shims"
    folder.mkdir()
    (folder / "python3").write_text(SHIM)
    (folder / "python3").chmod(0o755)
    return folder / "python3"


def test_qgis_s_python_is_found_from_its_installation_not_from_path(geochange_provider, shim, monkeypatch):
    from geochange.qgis_plugin import worker_client

    monkeypatch.setattr(sys, "executable", str(shim))
    worker_client._qgis_python.cache_clear()
    try:
        python = worker_client.qgis_python()
        assert python.parent == Path(sys.exec_prefix) / "bin" and python.name == "python{}.{}".format(
            *sys.version_info[:2])
        # Nothing but the shim: the error says what each candidate is.
        monkeypatch.setattr(worker_client, "_candidates", lambda: [shim])
        worker_client._qgis_python.cache_clear()
        with pytest.raises(QgsProcessingException, match=f"Cannot find the Python interpreter QGIS runs .*: {shim} "
                                                         "is no Python \\(exit status 127: pyenv"):
            worker_client.qgis_python()
    finally:
        worker_client._qgis_python.cache_clear()
    # Another Python of the same version that lacks QGIS's GDAL is not QGIS's either.
    assert worker_client.interpreter_problem(Path("/nowhere/python3")) == "no such file"


class CancelAtPip(QgsProcessingFeedback):
    """Presses Cancel once pip has started."""

    def __init__(self):
        super().__init__()
        self.commands = []

    def pushCommandInfo(self, text):  # noqa: N802 (QGIS's name)
        self.commands.append(text)
        if " -m pip install " in text:
            self.cancel()


class CancelAtVenv(CancelAtPip):
    def pushCommandInfo(self, text):  # noqa: N802 (QGIS's name)
        self.commands.append(text)
        if " -m venv " in text:
            self.cancel()


def cancelled_set_up(folder, feedback: CancelAtPip) -> CancelAtPip:
    """The set-up of ``folder``, cancelled by ``feedback``, which it returns (the commands it saw)."""
    with pytest.raises(QgsProcessingException, match="set-up cancelled by the user; the environment may be incomplete, "
                                                     "and if the engine already ran from it, it may not run until the "
                                                     "set-up is run again"):
        run_algorithm("geochange:setupengine", {"FOLDER": str(folder)}, feedback)
    return feedback


def test_a_set_up_stopped_while_it_makes_the_environment_is_its_own_to_make_again(geochange_provider, tmp_path):
    """The folder is marked as this algorithm's before venv runs (venv writes pyvenv.cfg before it installs pip:
    one that fails there, or a cancel, left a folder the next set-up refused as another's)."""
    from geochange.qgis_plugin.setup_algorithm import MADE_HERE

    cancelled_set_up(tmp_path / "env", CancelAtVenv())
    assert (tmp_path / "env" / MADE_HERE).is_file()
    feedback = cancelled_set_up(tmp_path / "env", CancelAtPip())
    assert " -m venv --system-site-packages " in feedback.commands[0] and (tmp_path / "env" / "pyvenv.cfg").is_file()
    # Made again (its Python gone): venv --clear empties the folder, and the mark is written again after it.
    for python in (tmp_path / "env" / "bin").glob("python*"):
        python.unlink()
    feedback = cancelled_set_up(tmp_path / "env", CancelAtPip())
    assert " -m venv --system-site-packages --clear " in feedback.commands[0]
    assert (tmp_path / "env" / MADE_HERE).is_file()


def test_the_set_up_refuses_a_folder_of_other_files_and_can_be_cancelled(geochange_provider, tmp_path):
    from geochange.qgis_plugin.worker_client import PYTHON_SETTING_KEY

    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / "thesis.odt").write_text("mine")
    with pytest.raises(QgsProcessingException, match="FOLDER: .*documents holds files and is no Python environment"):
        run_algorithm("geochange:setupengine", {"FOLDER": str(tmp_path / "documents")})
    assert (tmp_path / "documents" / "thesis.odt").read_text() == "mine"

    before = QgsSettings().value(PYTHON_SETTING_KEY, "")
    feedback = cancelled_set_up(tmp_path / "env", CancelAtPip())
    assert " -m venv --system-site-packages " in feedback.commands[0]
    assert (tmp_path / "env" / "pyvenv.cfg").is_file()  # made, then pip was stopped
    assert QgsSettings().value(PYTHON_SETTING_KEY, "") == before  # the engine's interpreter is unchanged

    # Another's environment whose Python is gone is not remade (cleared): only one this algorithm made.
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "pyvenv.cfg").write_text("home = /nowhere\n")
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(QgsProcessingException, match="theirs holds a Python environment this algorithm did not make, "
                                                     "and its Python cannot serve \\(.*: no such file\\): choose"):
        run_algorithm("geochange:setupengine", {"FOLDER": str(tmp_path / "theirs")})
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine"


def test_the_set_up_refuses_a_file_an_unreadable_folder_or_an_old_python(geochange_provider, tmp_path, monkeypatch):
    """A FOLDER that is a file failed in mkdir with a traceback; one not to be looked at raised in the check;
    a QGIS on Python 3.9 made the environment, then pip found no PyTorch for it."""
    (tmp_path / "a_file").write_text("mine")
    with pytest.raises(QgsProcessingException, match="FOLDER: .*a_file is a file: choose a new or empty folder"):
        run_algorithm("geochange:setupengine", {"FOLDER": str(tmp_path / "a_file")})
    with pytest.raises(QgsProcessingException, match="FOLDER: .* cannot be used \\(File name too long\\)"):
        run_algorithm("geochange:setupengine", {"FOLDER": str(tmp_path / ("x" * 300))})  # stat fails, as unreadable
    monkeypatch.setattr(sys, "version_info", (3, 9, 18, "final", 0))
    with pytest.raises(QgsProcessingException, match=r"QGIS's Python is 3\.9; the engine needs Python 3\.10 or later"):
        run_algorithm("geochange:setupengine", {"FOLDER": str(tmp_path / "env")})
    assert not (tmp_path / "env").exists()


def test_the_set_up_s_commands_import_nothing_from_qgis_s_current_folder(geochange_provider, tmp_path, monkeypatch):
    """``python -c`` and ``python -m`` import first from the current folder, QGIS's: a ``venv.py`` or ``csv.py``
    there (a downloaded dataset's folder, a project's) ran as the set-up made the environment."""
    from geochange.qgis_plugin.setup_algorithm import installed_version

    planted = tmp_path / "downloads"
    planted.mkdir()
    for module in ("venv", "csv"):
        (planted / f"{module}.py").write_text(f"open({str(tmp_path / module)!r} + '.ran', 'w').close()\n"
                                              f"raise SystemExit('planted {module}.py ran')\n")
    monkeypatch.chdir(planted)
    feedback = cancelled_set_up(tmp_path / "env", CancelAtPip())  # venv makes the environment, pip is cancelled
    assert " -m venv --system-site-packages " in feedback.commands[0]
    assert installed_version(Path(sys.executable), "numpy") is not None  # importlib.metadata imports csv
    assert not list(tmp_path.glob("*.ran"))


@pytest.mark.parametrize("installed, build, again", [
    (None, "CPU", False),
    ("2.14.1+cpu", "CPU", False),
    ("2.14.1+cu126", "CPU", True),
    ("2.14.1+cpu", "CUDA 12.8", True),
    ("2.14.1", "CPU", True),  # pip's own index's build, then PyTorch's CPU one
    ("2.14.1+cu130", "pip's configured index", True),
    ("2.14.1", "pip's configured index", False),
])
def test_pytorch_is_installed_again_only_for_another_build(geochange_provider, installed, build, again):
    from geochange.qgis_plugin.setup_algorithm import TORCH_BUILDS, other_build

    assert other_build(installed, TORCH_BUILDS[build]) is again


def results_of(done) -> dict:
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)["results"]


@pytest.mark.slow
def test_first_run_after_install_from_zip_sets_up_the_engine_then_detects(plugin_zip, shim, tinycd_package,
                                                                          shared_data, tmp_path):
    """A fresh profile and user, the plugin unzipped as QGIS's installer does (no .venv beside it), a PATH
    whose python3 is a broken shim: Detect changes says to run the set-up; the set-up (PyTorch from pip's
    configured index, the only one this offline machine reaches; CPU) makes the environment in the per-user
    default folder; Detect changes then runs in it."""
    if not os.access(QGIS_PROCESS, os.X_OK):
        pytest.skip(f"{QGIS_PROCESS} not found (set GEOCHANGE_QGIS_PROCESS)")
    plugins = tmp_path / "plugins"
    with zipfile.ZipFile(plugin_zip) as zf:
        zf.extractall(plugins)
    home = tmp_path / "home"
    env = qgis_process_environment(home, plugins)
    env["PATH"] = f"{shim.parent}:/usr/bin:/bin"

    def qgis_process(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([QGIS_PROCESS, *args], env=env, capture_output=True, text=True, timeout=timeout)

    enabled = qgis_process("plugins", "enable", "geochange", timeout=120)
    assert enabled.returncode == 0, enabled.stdout + enabled.stderr
    tile = shared_data / "levir_tile_georef"
    detect = ["run", "geochange:detectchanges", "--", f"PRE={tile / 'pre.tif'}", f"POST={tile / 'post.tif'}",
              f"MODEL={tinycd_package}", "DEVICE=cpu", f"OUTPUT_PROBABILITY={tmp_path / 'p.tif'}",
              f"OUTPUT_MASK={tmp_path / 'm.tif'}", f"OUTPUT_POLYGONS={tmp_path / 'c.gpkg'}"]

    refused = qgis_process(*detect)
    text = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "lacks: " in text and "torch" in text, text
    python3 = "/usr/bin/python{}.{}".format(*sys.version_info[:2])
    assert f"Interpreter: {python3} " in text and "chosen by QGIS's own Python" in text, text
    assert "Run 'Set up the GeoChange engine' (Processing Toolbox > GeoChange > Set-up) once" in text

    set_up = results_of(qgis_process("--json", "run", "geochange:setupengine", "--", "TORCH=pip's configured index",
                                     timeout=1200))
    folder = home / "data" / "geochange" / "engine-python{}.{}".format(*sys.version_info[:2])  # XDG_DATA_HOME
    assert set_up["PYTHON"] == str(folder / "bin" / "python")
    assert set_up["TORCH_VERSION"].startswith("2.14.1") and set_up["CUDA"] is False
    config = (folder / "pyvenv.cfg").read_text()
    assert "home = /usr/bin\n" in config and "include-system-site-packages = true" in config

    done = qgis_process(*detect, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"on Python {'.'.join(map(str, sys.version_info[:3]))} ({folder / 'bin' / 'python'})" in done.stdout
    assert "backend openvino: " in done.stdout, done.stdout  # the set-up installed the CPU runtime too
    count = next(line for line in done.stdout.splitlines() if line.startswith("POLYGON_COUNT"))
    assert int(float(count.split(":")[1])) > 0, done.stdout

    # Many pairs on a local Dask cluster: its worker processes import the plugin's folder too.
    table = tmp_path / "pairs.csv"
    table.write_text(f"name,pre,post\nlevir,{tile / 'pre.tif'},{tile / 'post.tif'}\n")
    many = results_of(qgis_process("--json", "run", "geochange:detectmanypairs", "--", f"PAIRS={table}",
                                   f"MODEL={tinycd_package}", "DEVICE=cpu", "WORKERS=1",
                                   f"OUTPUT={tmp_path / 'many'}", timeout=600))
    assert (many["DONE"], many["FAILED"]) == (1, 0), many
