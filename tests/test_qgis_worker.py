"""The engine process behind the QGIS plugin: its protocol, cancel by SIGTERM, crashes, a Python
without the engine's packages, and how its interpreter is chosen."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("qgis.core", reason="QGIS Python bindings are not installed")
from qgis.core import QgsProcessingException, QgsProcessingFeedback, QgsSettings  # noqa: E402

from conftest import REPO, run_algorithm  # noqa: E402

VENV_PYTHON = REPO / ".venv" / "bin" / "python"


def detect_job(levir_crop, package, folder: Path) -> dict:
    return {"task": "detect", "args": {
        "pre": str(levir_crop["pre"]), "post": str(levir_crop["post"]), "model": str(package),
        "probability": str(folder / "p.tif"), "mask": str(folder / "m.tif"), "polygons": str(folder / "c.gpkg"),
        "tile": 64, "overlap": 16, "batch": 1, "device": "cpu"}}


def test_worker_protocol_and_clean_exit_on_sigterm(levir_crop, tinycd_package, tmp_path):
    """SIGTERM while outputs are being written: the engine unwinds, reports the cancel and removes
    every temporary; nothing is left in the output folder."""
    out = tmp_path / "out"
    worker = subprocess.Popen([sys.executable, "-m", "geochange.engine.worker"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    worker.stdin.write(json.dumps(detect_job(levir_crop, tinycd_package, out)))
    worker.stdin.close()
    messages = []
    for line in worker.stdout:
        messages.append(json.loads(line))  # every stdout line is protocol JSON
        if messages[-1].get("progress", 0) > 0:
            break
    partials = sorted(p.name for p in out.iterdir())
    assert partials and all(".partial." in name for name in partials), partials  # outputs are being written
    worker.send_signal(signal.SIGTERM)
    messages += [json.loads(line) for line in worker.stdout]
    assert worker.wait(timeout=60) == 2, worker.stderr.read()
    assert any("GeoChange engine" in m.get("log", "") for m in messages)
    assert messages[-1]["cancelled"] is True and "cancelled" in messages[-1]["error"]
    assert not out.exists()  # the folder the run made went with it


class KillWorkerAtFirstProgress(QgsProcessingFeedback):
    """Sends the engine process a signal once it is working, as a crashing CUDA driver would."""

    def __init__(self, signum):
        super().__init__()
        self.signum, self.pid = signum, None
        self.progressChanged.connect(self._on_progress)

    def pushDebugInfo(self, text):  # noqa: N802 (QGIS's name)
        if text.startswith("GeoChange engine process ") and self.pid is None:
            self.pid = int(text.split()[3].rstrip(":"))

    def _on_progress(self, percent):
        if self.pid is not None:
            os.kill(self.pid, self.signum)
            self.pid = 0


def test_a_crash_of_the_worker_is_reported_and_qgis_survives(geochange_provider, levir_crop, tinycd_package,
                                                             crop_detection, tmp_path):
    parameters = {"PRE": str(levir_crop["pre"]), "POST": str(levir_crop["post"]), "MODEL": str(tinycd_package),
                  "DEVICE": "cpu", "TILE_SIZE": 64, "OVERLAP": 16, "BATCH_SIZE": 1,
                  "OUTPUT_PROBABILITY": str(tmp_path / "p.tif"), "OUTPUT_MASK": str(tmp_path / "new" / "m.tif"),
                  "OUTPUT_POLYGONS": str(tmp_path / "new" / "folder" / "c.gpkg")}
    feedback = KillWorkerAtFirstProgress(signal.SIGSEGV)
    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("geochange:detectchanges", parameters, feedback)
    message = str(raised.value)
    assert feedback.pid == 0  # the signal was sent
    assert "killed by SIGSEGV (segmentation fault)" in message and "QGIS is unaffected" in message, message
    assert "Segmentation fault" in message  # the engine's own last words (faulthandler) are quoted
    assert list(tmp_path.iterdir()) == []  # its temporaries, and the folders made for them, were removed for it
    assert "nothing was written under the output names" in message
    # This process (QGIS) goes on: the next run works.
    again = run_algorithm("geochange:vectorizechanges", {
        "INPUT": crop_detection["results"]["OUTPUT_PROBABILITY"], "OUTPUT": str(tmp_path / "after.gpkg")})
    assert again["POLYGON_COUNT"] == crop_detection["results"]["POLYGON_COUNT"]


def test_a_crash_during_many_pairs_says_the_finished_pairs_are_kept():
    from collections import deque

    from geochange.qgis_plugin.worker_client import _crash_message

    message = _crash_message("detect_many", -9, Path("/venv/bin/python"), deque())
    assert message == ("The GeoChange engine process (/venv/bin/python) was killed by SIGKILL (killed, e.g. out of "
                       "memory) while running 'detect_many'. QGIS is unaffected and the pairs it finished "
                       "are complete in their folders.")


@pytest.fixture(scope="module")
def python_without_torch(tmp_path_factory) -> Path:
    """A bare venv of the system Python: no torch, no numpy, nothing of the engine's."""
    folder = tmp_path_factory.mktemp("bare_venv")
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0
    return python


def test_qgis_process_loads_without_torch_and_says_what_to_install(qgis_process, tinycd_package,
                                                                   python_without_torch, tmp_path):
    environment = {"GEOCHANGE_PYTHON": str(python_without_torch)}
    listed = qgis_process("list", environment=environment)
    assert "geochange:modelinfo" in listed.stdout, listed.stdout + listed.stderr
    done = qgis_process("run", "geochange:modelinfo", "--", f"MODEL={tinycd_package}",
                        f"OUTPUT={tmp_path / 'info.html'}", environment=environment)
    assert done.returncode != 0
    text = done.stdout + done.stderr
    # Every package the engine needs, in one message, with the command that installs them there.
    assert "lacks: numpy, torch, timm, safetensors, rasterio, shapely, scipy, pyproj, osgeo" in text, text
    assert (f'{python_without_torch} -m pip install "numpy<2" torch timm safetensors rasterio shapely '
            "scipy pyproj") in text
    assert "Run 'Set up the GeoChange engine' (Processing Toolbox > GeoChange > Set-up) once" in text
    assert "python3-gdal" in text  # GDAL's bindings come from the system
    assert "chosen by the environment variable GEOCHANGE_PYTHON" in text
    assert "Processing > Providers > GeoChange" in text
    assert not (tmp_path / "info.html").exists()


def test_the_interpreter_setting_wins_over_the_environment(geochange_provider, python_without_torch,
                                                           monkeypatch):
    from geochange.qgis_plugin import worker_client

    settings = QgsSettings()
    monkeypatch.delenv("GEOCHANGE_PYTHON", raising=False)
    settings.remove(worker_client.PYTHON_SETTING_KEY)
    assert worker_client.worker_python() == (VENV_PYTHON, "the .venv beside the plugin")
    monkeypatch.setenv("GEOCHANGE_PYTHON", "/nowhere/python")
    assert worker_client.worker_python()[0] == Path("/nowhere/python")
    settings.setValue(worker_client.PYTHON_SETTING_KEY, str(python_without_torch))
    try:
        assert worker_client.worker_python() == (
            python_without_torch, "the GeoChange setting 'Python interpreter for the engine'")
        # Processing's options page lists the setting under the provider.
        from processing.core.ProcessingConfig import ProcessingConfig

        assert ProcessingConfig.settings[worker_client.PYTHON_SETTING].group == "GeoChange"
    finally:
        settings.remove(worker_client.PYTHON_SETTING_KEY)
    with pytest.raises(QgsProcessingException, match="/nowhere/python .*does not exist"):
        run_algorithm("geochange:modelinfo", {"MODEL": "x.safetensors", "OUTPUT": "/tmp/never.html"})


def test_each_task_s_worker_serves_it():
    """The plugin starts the module ``contracts.WORKERS`` names for a task: it serves that task."""
    from geochange.engine.contracts import ENGINE_WORKER, TRAINER_WORKER, WORKERS
    from geochange.engine.worker import TASKS
    from geochange.trainer.worker import TRAINER_TASKS

    served = {ENGINE_WORKER: set(TASKS), TRAINER_WORKER: set(TRAINER_TASKS) - set(TASKS)}
    assert {task: module for module, tasks in served.items() for task in tasks} == WORKERS


def test_worker_reports_an_unknown_task_without_importing_the_engine():
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "geochange.engine.worker"], input='{"task": "fly"}',
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert json.loads(done.stdout.splitlines()[-1])["error"].startswith("unknown task 'fly'")
    assert time.monotonic() - started < 10


def test_modules_in_qgis_s_working_folder_never_run_in_the_engine(geochange_provider, tinycd_package, tmp_path,
                                                                  monkeypatch):
    """``python -c`` puts the current folder first on sys.path: modules planted there under the names of
    the standard library's (ones the bootstrap and the engine import) must not be imported."""
    folder = tmp_path / "working_folder"
    folder.mkdir()
    for module in ("runpy", "json", "concurrent"):
        (folder / f"{module}.py").write_text(f"open({str(tmp_path / (module + '.ran'))!r}, 'w').close()\n")
    monkeypatch.chdir(folder)
    try:
        results = run_algorithm("geochange:modelinfo", {"MODEL": str(tinycd_package),
                                                        "OUTPUT": str(tmp_path / "info.html")})
    finally:
        assert sorted(p.name for p in tmp_path.glob("*.ran")) == []
    assert results["ARCHITECTURE"] == "tinycd"


def test_engine_errors_name_the_algorithm_s_parameters(geochange_provider, levir_crop, random_package, tmp_path):
    """The engine refuses an overlap not under the engine's default tile of 512 px (a package recording no tile of
    its own, which QGIS's check does not know) as --overlap; QGIS shows OVERLAP."""
    with pytest.raises(QgsProcessingException) as raised:
        run_algorithm("geochange:detectchanges", {
            "PRE": str(levir_crop["pre"]), "POST": str(levir_crop["post"]), "MODEL": str(random_package),
            "DEVICE": "cpu", "OVERLAP": 600, "OUTPUT_PROBABILITY": str(tmp_path / "p.tif"),
            "OUTPUT_MASK": str(tmp_path / "m.tif"), "OUTPUT_POLYGONS": str(tmp_path / "c.gpkg")})
    assert str(raised.value) == "OVERLAP must be in [0, tile) = [0, 512), not 600"
