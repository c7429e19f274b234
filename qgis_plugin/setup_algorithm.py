"""Processing algorithm ``geochange:setupengine``: the engine's Python environment, made from inside QGIS.

A plugin installed from its zip has no engine environment, and QGIS's own Python has no torch. This makes
one: a virtual environment on QGIS's Python (``worker_client.qgis_python``) with ``--system-site-packages``,
so that QGIS's GDAL bindings stay importable beside what pip installs; PyTorch's CPU or CUDA build; the rest
of ``requirements.txt`` (shipped in the plugin); then the engine checks the environment (worker task
``check``) and its interpreter becomes the engine's (``worker_client.record_worker_python``).
"""
from __future__ import annotations

import queue
import re
import shlex
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from qgis.core import (
    QgsProcessingException,
    QgsProcessingOutputBoolean,
    QgsProcessingOutputFile,
    QgsProcessingOutputString,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
)
from qgis.PyQt.QtCore import QStandardPaths

from geochange.qgis_plugin.engine_algorithm import EngineAlgorithm, tr
from geochange.qgis_plugin.worker_client import (
    CANCEL_GRACE_S,
    NO_WINDOW,
    PLUGIN_ROOT,
    PROBE_TIMEOUT_S,
    SETUP_ALGORITHM,
    engine_environment,
    interpreter_problem,
    qgis_python,
    read_lines,
    record_worker_python,
    run_task,
    venv_python,
)

REQUIREMENTS = PLUGIN_ROOT / "requirements.txt"
TORCH_PACKAGES = ("torch", "torchvision")
# Where each PyTorch build comes from: PyTorch's own package index (its CPU index has the small CPU-only
# wheels for Linux, Windows and macOS; PyPI's Linux wheels bring CUDA's libraries, GBs of them), or the index
# pip is configured with (PyPI, or a mirror or local disk where there is no internet). PyTorch's indexes label
# their builds' versions with their folder's name (2.14.1+cpu, 2.14.1+cu126; not macOS's CPU wheels, which a
# re-run there installs again).
PIP_INDEX = "pip's configured index"
TORCH_BUILDS = {"CPU": "https://download.pytorch.org/whl/cpu",
                "CUDA 12.6": "https://download.pytorch.org/whl/cu126",
                "CUDA 12.8": "https://download.pytorch.org/whl/cu128",
                "CUDA 13.0": "https://download.pytorch.org/whl/cu130",
                PIP_INDEX: None}
PIP_INSTALL = ("-m", "pip", "install", "--progress-bar", "off", "--disable-pip-version-check", "--no-input")
MIN_PYTHON = (3, 10)  # the engine's (pyproject.toml's requires-python)
QUOTED_LINES = 25  # of a failed command's output, in its error
# Written into an environment this algorithm made: only such a one is ever made again (cleared).
MADE_HERE = "made-by-geochange-setup.txt"


def default_folder() -> Path:
    """Per user and shared by QGIS's profiles, in the platform's data folder ($XDG_DATA_HOME or ~/.local/share
    on Linux, ~/Library/Application Support on macOS, %LOCALAPPDATA% on Windows); one environment per Python
    version, so that a QGIS with a newer Python gets a new one."""
    data = Path(QStandardPaths.writableLocation(QStandardPaths.GenericDataLocation))
    return data / "geochange" / "engine-python{}.{}".format(*sys.version_info[:2])


def requirements(path: Path = REQUIREMENTS) -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines left out)."""
    lines = (line.split("#")[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group().lower()


def installed_version(python: Path, package: str) -> str | None:
    """``package``'s version in the environment of ``python``; None where it is not installed. Run in the environment's
    folder: ``-c`` imports first from the current folder, QGIS's, which may hold anyone's ``csv.py``."""
    done = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
                          capture_output=True, text=True, env=engine_environment(python), timeout=PROBE_TIMEOUT_S,
                          creationflags=NO_WINDOW, cwd=python.parent.parent)
    return done.stdout.strip() if done.returncode == 0 else None


def other_build(installed: str | None, index: str | None) -> bool:
    """Whether the ``installed`` PyTorch version (None: none) is another build than ``index`` (None: pip's own)
    gives: pip would keep it as it is, the pinned version being installed, so a change of build is a reinstall.
    PyTorch's indexes label their builds ("2.14.1+cpu"), pip's own index has them unlabelled ("2.14.1")."""
    if installed is None:
        return False
    return not installed.endswith("+" + index.split("/")[-1]) if index else "+" in installed


def run_command(command: list[str], feedback, env: dict, failure: str, folder: Path) -> None:
    """Run ``command`` in ``folder`` (the environment's: ``-m`` imports first from the current folder, QGIS's, which
    may hold anyone's ``venv.py``) with its output in the log; QgsProcessingException, with ``failure`` and the
    output's last lines, if it fails; Cancel stops it (SIGTERM, then a kill after ``CANCEL_GRACE_S``)."""
    feedback.pushCommandInfo(shlex.join(command))
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, encoding="utf-8", errors="replace", env=env, creationflags=NO_WINDOW,
                               cwd=folder)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(process.stdout, "out", lines), daemon=True).start()
    tail: deque = deque(maxlen=QUOTED_LINES)
    with process:
        while True:
            if feedback.isCanceled():
                process.terminate()
                try:
                    process.wait(CANCEL_GRACE_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                # pip stopped mid-install leaves its packages half-replaced: where the engine already runs from
                # this environment (a set-up run again to change PyTorch's build), it may not run until completed.
                raise QgsProcessingException(tr("GeoChange: set-up cancelled by the user; the environment may be "
                                                "incomplete, and if the engine already ran from it, it may not run "
                                                "until the set-up is run again to complete it. The engine's "
                                                "interpreter setting is unchanged."))
            try:
                _, line = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            tail.append(line)
            feedback.pushConsoleInfo(line)
        returncode = process.wait()
    if returncode:
        raise QgsProcessingException(tr("{} (exit status {}). Its last output:\n{}").format(
            failure, returncode, "\n".join(tail)))


class SetupEngineAlgorithm(EngineAlgorithm):
    NAME = "setupengine"
    DISPLAY_NAME = SETUP_ALGORITHM
    GROUP = "setup"
    SUMMARY = ("<p>Makes the Python environment the GeoChange engine runs in, once, after installing the "
               "plugin: a virtual environment on QGIS's own Python that still sees QGIS's GDAL, with PyTorch "
               "and the engine's other packages installed by pip from the internet (a few GB for a CUDA "
               "build, a few hundred MB for the CPU one). Then the engine checks it, and every GeoChange "
               "algorithm uses it: its interpreter is written into <i>Settings &gt; Options &gt; Processing "
               "&gt; Providers &gt; GeoChange</i>.</p><p>Run it again to complete or repair an environment (what "
               "is installed is kept) or to change the PyTorch build (PyTorch is then installed again).</p>")
    PARAMETER_HELP = {
        "TORCH": "Which PyTorch to install. <i>CPU</i> runs everywhere. A <i>CUDA</i> build runs the models on "
                 "an NVIDIA GPU; take the newest CUDA version your driver supports (<code>nvidia-smi</code> "
                 "shows it top right). Both come from PyTorch's package index "
                 "(<code>download.pytorch.org</code>). <i>pip's configured index</i>: wherever pip installs "
                 "from on this machine (PyPI, whose Linux wheels are CUDA builds, or a local mirror).",
        "FOLDER": "Where the environment is made: a new or empty folder, or an environment this algorithm made "
                  "before. Empty: the default, per user and shared by all QGIS profiles.",
        "PYTHON": "The environment's Python interpreter, now the engine's.",
        "TORCH_VERSION": "The PyTorch version installed.",
        "CUDA": "Whether that PyTorch sees a CUDA GPU (else the engine runs on the CPU).",
    }

    def tags(self):
        return tr("install,setup,set up,pip,pytorch,cuda,environment,venv,dependencies").split(",")

    def initAlgorithm(self, config=None):  # noqa: N802 (QGIS's name)
        self.addParameter(QgsProcessingParameterEnum("TORCH", tr("PyTorch build"), options=list(TORCH_BUILDS),
                                                     defaultValue="CPU", usesStaticStrings=True))
        self.addParameter(QgsProcessingParameterFile("FOLDER", tr("Environment folder"),
                                                     behavior=QgsProcessingParameterFile.Folder,
                                                     defaultValue=str(default_folder()), optional=True))
        self.addOutput(QgsProcessingOutputFile("PYTHON", tr("Engine's Python interpreter")))
        self.addOutput(QgsProcessingOutputString("TORCH_VERSION", tr("PyTorch version")))
        self.addOutput(QgsProcessingOutputBoolean("CUDA", tr("CUDA available")))

    def checkParameterValues(self, parameters, context):  # noqa: N802 (QGIS's name)
        """A folder holding anything else is refused: remaking an environment clears its folder."""
        ok, message = super().checkParameterValues(parameters, context)
        if not ok:
            return ok, message
        if sys.version_info[:2] < MIN_PYTHON:  # pip would fail to find PyTorch for it, after making the environment
            return False, tr("QGIS's Python is {}.{}; the engine needs Python {}.{} or later (PyTorch's wheels): use a "
                             "QGIS built with a newer Python").format(*sys.version_info[:2], *MIN_PYTHON)
        folder = self.folder(parameters, context)
        try:
            if folder.exists() and not folder.is_dir():
                return False, tr("FOLDER: {} is a file: choose a new or empty folder").format(folder)
            if (folder.is_dir() and not (folder / "pyvenv.cfg").is_file() and not (folder / MADE_HERE).is_file()
                    and any(folder.iterdir())):
                return False, tr("FOLDER: {} holds files and is no Python environment: choose a new or empty "
                                 "folder").format(folder)
        except OSError as error:  # a folder this user may not read
            return False, tr("FOLDER: {} cannot be used ({})").format(folder, error.strerror)
        return ok, message

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802 (QGIS's name)
        build = self.parameterAsEnumString(parameters, "TORCH", context)
        folder = self.folder(parameters, context)
        python = venv_python(folder)
        self._make_environment(folder, python, feedback)
        index = TORCH_BUILDS[build]
        installed = installed_version(python, "torch")
        replace = other_build(installed, index)
        feedback.pushInfo(tr("Installing PyTorch ({}) from {}{}").format(
            build, index or PIP_INDEX, tr(" in place of {}").format(installed) if replace else ""))
        feedback.setProgress(5)
        torch = [line for line in requirements() if requirement_name(line) in TORCH_PACKAGES]
        run_command([str(python), *PIP_INSTALL, *torch, *(["--index-url", index] if index else []),
                     *(["--force-reinstall", "--no-deps"] if replace else [])], feedback, engine_environment(python),
                    tr("pip could not install PyTorch ({})").format(build), folder)
        feedback.pushInfo(tr("Installing the engine's other packages ({})").format(REQUIREMENTS))
        feedback.setProgress(60)
        run_command([str(python), *PIP_INSTALL, "-r", str(REQUIREMENTS)], feedback, engine_environment(python),
                    tr("pip could not install the engine's packages"), folder)
        feedback.setProgress(90)
        report = run_task("check", {}, feedback, interpreter=(python, tr("the environment just made")))
        record_worker_python(python)
        feedback.pushInfo(tr("PyTorch {} ({}); the engine now runs with {}").format(
            report["torch"], ", ".join(report["gpus"]) if report["cuda"] else tr("CPU"), python))
        if build.startswith("CUDA") and not report["cuda"]:
            feedback.reportError(tr("PyTorch's {} build sees no GPU (no NVIDIA driver, or one older than {} "
                                    "needs): the engine will run on the CPU").format(build, build), False)
        return {"PYTHON": str(python), "TORCH_VERSION": report["torch"], "CUDA": report["cuda"]}

    def folder(self, parameters, context) -> Path:
        # Optional with a default: qgis_process asks for every mandatory file parameter, default or not.
        # Absolute: the set-up's commands run in it (run_command), where a relative name would point elsewhere.
        return Path(self.parameterAsFile(parameters, "FOLDER", context) or default_folder()).absolute()

    def _make_environment(self, folder: Path, python: Path, feedback) -> None:
        """The virtual environment in ``folder``, kept if it is one of QGIS's Python, else made (again)."""
        clear = []
        if (folder / "pyvenv.cfg").is_file():
            problem = interpreter_problem(python)
            if problem is None:
                feedback.pushInfo(tr("Completing the environment in {}").format(folder))
                return
            if not (folder / MADE_HERE).is_file():
                raise QgsProcessingException(tr("{} holds a Python environment this algorithm did not make, and its "
                                                "Python cannot serve ({}: {}): choose another folder (this one is "
                                                "left as it is)").format(folder, python, problem))
            feedback.pushInfo(tr("Making the environment in {} again: its Python {}").format(folder, problem))
            clear = ["--clear"]
        base = qgis_python()
        feedback.pushInfo(tr("QGIS's Python: {} (Python {}.{}.{})").format(base, *sys.version_info[:3]))
        # Marked before venv runs: venv writes the folder's pyvenv.cfg before it installs pip, so one that fails
        # there (no ensurepip on Debian without python3-venv; a cancel) leaves an environment this algorithm
        # must be free to make again. Marked after it too: --clear empties the folder, the mark with it.
        mark = "Made by GeoChange's 'Set up the GeoChange engine', which may make it again.\n"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MADE_HERE).write_text(mark, encoding="utf-8")
        try:
            run_command([str(base), "-m", "venv", "--system-site-packages", *clear, str(folder)], feedback,
                        engine_environment(base), tr("QGIS's Python could not make a virtual environment in {}")
                        .format(folder), folder)
        finally:
            (folder / MADE_HERE).write_text(mark, encoding="utf-8")
