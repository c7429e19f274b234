"""Run an engine task in a child Python process and relay it to a Processing feedback.

QGIS never imports torch: the engine runs in the task's worker module (``engine.contracts.WORKERS``)
under an interpreter chosen by ``worker_python``. Its JSON lines (``engine.contracts``) become progress
and log messages, Cancel terminates it (SIGTERM, on which the engine removes its temporaries), its
errors become ``QgsProcessingException`` with the engine's message, and a crash (segfault, CUDA fault,
out-of-memory kill) ends only the child.
"""
from __future__ import annotations

import functools
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from qgis.core import QgsProcessingException, QgsSettings

from geochange.engine import contracts
from geochange.engine.atomic import missing_folders, remove_empty_folders, remove_left_temporaries

PLUGIN_ROOT = Path(__file__).resolve().parent.parent
# QgsSettings key of the interpreter setting (Settings > Options > Processing > Providers > GeoChange).
PYTHON_SETTING = "GEOCHANGE_PYTHON"
PYTHON_SETTING_KEY = "Processing/Configuration/" + PYTHON_SETTING
PYTHON_ENV = "GEOCHANGE_PYTHON"
# The algorithm that makes the engine's environment (setup_algorithm.py), which the missing-dependency error names.
SETUP_ALGORITHM = "Set up the GeoChange engine"
# Seconds a cancelled engine gets to clean up before it is killed.
CANCEL_GRACE_S = 20.0
# Loads the package ``geochange`` from this plugin's folder whatever the folder is called and whatever
# the interpreter has installed, so the engine that runs is always the plugin's own copy. ``-c`` puts
# the current folder (QGIS's, anyone's) first on sys.path: it is dropped before anything is imported,
# so that a ``json.py`` or ``concurrent.py`` there never runs. (Not ``-I``: it would also drop the
# PYTHONPATH and user site-packages that QGIS's own Python may need; not ``-P``: Python 3.11+ only.)
DROP_CURRENT_FOLDER = """\
import sys
if sys.path and sys.path[0] == "":
    del sys.path[0]
"""
BOOTSTRAP = DROP_CURRENT_FOLDER + """\
import importlib.util, runpy
root, module = sys.argv.pop(1), sys.argv.pop(1)
spec = importlib.util.spec_from_file_location("geochange", root + "/__init__.py",
                                              submodule_search_locations=[root])
package = importlib.util.module_from_spec(spec)
sys.modules["geochange"] = package
spec.loader.exec_module(package)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
STDERR_QUOTED = 30  # lines of the engine's stderr quoted in a crash report
SIGNAL_MEANINGS = {"SIGSEGV": "segmentation fault", "SIGABRT": "aborted", "SIGKILL": "killed, e.g. out of memory",
                   "SIGBUS": "bus error", "SIGFPE": "arithmetic fault", "SIGILL": "illegal instruction"}


# QGIS's own interpreter. Inside QGIS, ``sys.executable`` is not it: an embedded Python takes for its executable
# the first "python3" on PATH (a pyenv shim, another installation's Python), and on Windows and macOS it may be
# QGIS itself. What is QGIS's is the running interpreter's installation: ``sys.exec_prefix`` (a virtual
# environment where one hosts QGIS) then ``sys.base_exec_prefix``, which hold bin/python3.X on Linux and macOS
# (Debian: /usr/bin/python3.11; QGIS.app: Contents/MacOS/bin/python3.X or its Python.framework's) and python.exe
# on Windows (OSGeo4W and the standalone installer: apps\Python3X\python.exe). ``sys.executable`` is the last
# candidate. Each candidate is run: it is QGIS's when it is this very Python version (``sys.version_info``) and
# imports GDAL's bindings (``osgeo``), as QGIS does.
PROBE = DROP_CURRENT_FOLDER + """print("%d.%d.%d" % sys.version_info[:3], flush=True)
import osgeo
print("osgeo")
"""
PROBE_TIMEOUT_S = 60.0
# Child processes get no console window of their own on Windows.
NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0)


def interpreter_problem(python: Path) -> str | None:
    """Why ``python`` cannot stand for QGIS's own interpreter (see ``PROBE``); None when it can. Run with QGIS's
    environment, which QGIS's interpreter keeps in the engine's process."""
    if not python.is_file():
        return "no such file"
    try:
        done = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                              creationflags=NO_WINDOW)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot be run ({e})"
    lines, version = done.stdout.split(), "{}.{}.{}".format(*sys.version_info[:3])
    if not lines:
        return f"is no Python (exit status {done.returncode}: {done.stderr.strip()[-200:]})"
    if lines[0] != version:
        return f"is Python {lines[0]}, QGIS runs {version}"
    return None if lines[-1] == "osgeo" else "cannot import GDAL's bindings (osgeo)"


def _candidates() -> list[Path]:
    homes = dict.fromkeys(Path(prefix) for prefix in (sys.exec_prefix, sys.base_exec_prefix))
    names = (["python.exe", "python3.exe"] if os.name == "nt" else
             ["bin/python{}.{}".format(*sys.version_info[:2]), "bin/python3"])
    return list(dict.fromkeys([home / name for home in homes for name in names] + [Path(sys.executable)]))


@functools.lru_cache(maxsize=None)
def _qgis_python() -> tuple[Path | None, tuple[str, ...]]:
    """QGIS's interpreter (None if no candidate passes) and why each one before it failed."""
    refused = []
    for candidate in _candidates():
        problem = interpreter_problem(candidate)
        if problem is None:
            return candidate, tuple(refused)
        refused.append(f"{candidate} {problem}")
    return None, tuple(refused)


def qgis_python() -> Path:
    """The Python interpreter QGIS itself runs (see ``PROBE``), found once per session."""
    python, refused = _qgis_python()
    if python is None:
        _qgis_python.cache_clear()  # the next call looks again (a probe may time out while QGIS starts)
        raise QgsProcessingException(
            "Cannot find the Python interpreter QGIS runs (Python {}.{}.{} with GDAL's bindings): {}. Choose an "
            "interpreter in Settings > Options > Processing > Providers > GeoChange.".format(
                *sys.version_info[:3], "; ".join(refused)))
    return python


def worker_python() -> tuple[Path, str]:
    """The interpreter that runs the engine and where that choice came from."""
    configured = str(QgsSettings().value(PYTHON_SETTING_KEY, "") or "").strip()
    if configured:
        return Path(configured), "the GeoChange setting 'Python interpreter for the engine'"
    if os.environ.get(PYTHON_ENV, "").strip():
        return Path(os.environ[PYTHON_ENV].strip()), f"the environment variable {PYTHON_ENV}"
    venv = venv_python(PLUGIN_ROOT / ".venv")
    if venv.exists():
        return venv, "the .venv beside the plugin"
    return qgis_python(), "QGIS's own Python"


def venv_python(folder: Path) -> Path:
    """The interpreter of the virtual environment in ``folder``."""
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def record_worker_python(python: Path) -> None:
    """Make ``python`` the engine's interpreter: the setting ``worker_python`` reads first, written through
    Processing's registry where it is loaded, so that its Options page shows the new value (and does not
    write back the old one)."""
    try:
        from processing.core.ProcessingConfig import ProcessingConfig
    except ImportError:  # Processing's Python plugin is not loaded: the setting is QgsSettings' alone
        ProcessingConfig = None  # noqa: N806 (the class's name)
    if ProcessingConfig is not None and PYTHON_SETTING in ProcessingConfig.settings:
        ProcessingConfig.setSettingValue(PYTHON_SETTING, str(python))
    else:
        QgsSettings().setValue(PYTHON_SETTING_KEY, str(python))


def engine_environment(python: Path) -> dict:
    """The environment of a child process run by ``python``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    if python != _qgis_python()[0]:
        # QGIS may point these at its own Python (e.g. on Windows); another interpreter must not inherit them.
        env.pop("PYTHONHOME", None)
        env.pop("PYTHONPATH", None)
    return env


def missing_dependency_message(error: contracts.EngineError, origin: str) -> str:
    missing = error.missing
    python = error.python
    # GDAL's bindings come from the system (see below), everything else from pip.
    packages = " ".join(f'"{m["pip"]}"' if "<" in m["pip"] else m["pip"]
                        for name, m in missing.items() if name != "osgeo")
    lines = [
        f"GeoChange needs Python packages that the interpreter running its engine lacks: "
        f"{', '.join(missing)}.",
        f"Interpreter: {python} (Python {error.version}), chosen by {origin}.",
        f"Run '{SETUP_ALGORITHM}' (Processing Toolbox > GeoChange > Set-up) once: it makes an environment with "
        "all of them on QGIS's Python and chooses it for every GeoChange algorithm.",
        "Or install them into that interpreter yourself:",
        f"    {python} -m pip install {packages}",
    ]
    if not error.venv:
        lines += ["That interpreter is not a virtual environment; if pip refuses to install into it, make one "
                  "that still sees QGIS's GDAL bindings and install there:",
                  f"    {python} -m venv --system-site-packages ~/geochange-venv",
                  f"    ~/geochange-venv/bin/python -m pip install {packages}"]
    if "torch" in missing:
        lines.append("For a GPU, take the PyTorch build that matches your CUDA driver (see "
                     "https://pytorch.org/get-started/locally/).")
    if "osgeo" in missing:
        lines.append("GDAL's bindings (osgeo) must match the GDAL installed on this system: install your "
                     "distribution's package (e.g. python3-gdal) and create the venv with --system-site-packages.")
    lines.append(f"Then choose that interpreter in Settings > Options > Processing > Providers > GeoChange > "
                 f"'Python interpreter for the engine' (or set the environment variable {PYTHON_ENV}).")
    lines += [f"  ({name} is installed but fails to import: {info['reason']})"
              for name, info in missing.items() if info["reason"] != "not installed"]
    return "\n".join(lines)


def _crash_message(task: str, returncode: int, python: Path, stderr: deque) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        how = f"was killed by {name}" + (f" ({SIGNAL_MEANINGS[name]})" if name in SIGNAL_MEANINGS else "")
    else:
        how = f"exited with status {returncode} without a result"
    written = ("the pairs it finished are complete in their folders" if task == "detect_many"
               else "nothing was written under the output names")
    text = f"The GeoChange engine process ({python}) {how} while running '{task}'. QGIS is unaffected and {written}."
    lines = list(stderr)
    # Python's fault handler reports the crash and the stacks of its threads: quote that report.
    fatal = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error")]
    lines = [line for line in lines[fatal[-1]:] if not line.startswith("Extension modules:")] if fatal else lines
    if lines:
        text += "\nIts last error output:\n" + "\n".join(lines[:STDERR_QUOTED])
    return text


def read_lines(stream, tag: str, lines: queue.Queue) -> None:
    """Put each line of ``stream`` on ``lines`` as ``(tag, line)``, then ``(tag, None)`` at its end."""
    for line in stream:
        lines.put((tag, line.rstrip("\n")))
    lines.put((tag, None))


def parameter_names(message: str, options: dict) -> str:
    """The engine's ``message`` with the command-line options it names (``--pre-bands``) spelt as the
    algorithm's parameters (``options``: ``{"--pre-bands": "PRE_BANDS"}``)."""
    return re.sub(r"--[a-z][a-z0-9-]*", lambda m: options.get(m.group(), m.group()), message)


def run_task(task: str, args: dict, feedback, outputs=(), options=None,
             interpreter: tuple[Path, str] | None = None) -> dict:
    """Run ``task`` with ``args`` in the engine process; its result dict, or QgsProcessingException.

    ``outputs`` are the files the task writes: if the process dies without cleaning up, their
    temporaries, and the folders made for them and left empty, are removed here. ``options`` maps the
    command-line options that engine messages and log lines name to the algorithm's parameters (see
    ``parameter_names``).
    ``interpreter``: ``(python, where it comes from)`` instead of ``worker_python``'s choice.
    """
    python, origin = interpreter or worker_python()
    outputs = [Path(output) for output in outputs]
    made = missing_folders(output.parent for output in outputs)  # before the engine makes them
    if not python.exists():
        raise QgsProcessingException(f"The Python interpreter for the GeoChange engine, {python} (chosen by "
                                     f"{origin}), does not exist.")
    try:
        process = subprocess.Popen([str(python), "-c", BOOTSTRAP, str(PLUGIN_ROOT), contracts.WORKERS[task]],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   encoding="utf-8", errors="replace", env=engine_environment(python),
                                   creationflags=NO_WINDOW)
    except OSError as e:
        raise QgsProcessingException(f"Cannot start the GeoChange engine with {python} ({origin}): {e}") from e
    with process:  # closes the pipes however this ends
        return _follow(process, task, args, feedback, outputs, made, python, origin, options or {})


def _follow(process, task, args, feedback, outputs, made, python, origin, options) -> dict:
    feedback.pushDebugInfo(f"GeoChange engine process {process.pid}: {python} ({origin}), task {task}")
    lines: queue.Queue = queue.Queue()
    for stream, tag in ((process.stdout, "out"), (process.stderr, "err")):
        threading.Thread(target=read_lines, args=(stream, tag, lines), daemon=True).start()
    try:
        process.stdin.write(contracts.job_text(task, args))
        process.stdin.close()
    except BrokenPipeError:  # it died at once; its exit status and stderr below say why
        pass

    stderr_tail: deque = deque(maxlen=200)
    result = error = None
    open_streams, cancelled_at = 2, None
    while open_streams:
        if cancelled_at is None and feedback.isCanceled():
            cancelled_at = time.monotonic()
            feedback.pushInfo("Cancelling: stopping the GeoChange engine process")
            process.terminate()
        elif cancelled_at is not None and time.monotonic() - cancelled_at > CANCEL_GRACE_S:
            process.kill()
        try:
            tag, line = lines.get(timeout=0.1)
        except queue.Empty:
            continue
        if line is None:
            open_streams -= 1
        elif tag == "err":
            stderr_tail.append(line)
            feedback.pushDebugInfo(line)
        elif (message := contracts.read_line(line)) is None:
            feedback.pushDebugInfo(line)
        else:
            kind, value = message
            if kind == contracts.PROGRESS:
                feedback.setProgress(value)
            elif kind == contracts.LOG:
                feedback.pushInfo(parameter_names(value, options))
            elif kind == contracts.RESULT:
                result = value
            else:
                error = value
    returncode = process.wait()

    if result is not None:
        return result
    if returncode < 0 or error is None:
        remove_left_temporaries(outputs)
        remove_empty_folders(made)
    if cancelled_at is not None:
        how = "stopped cleanly" if error is not None and error.cancelled else "was ended"
        written = ("the pairs finished before the cancel are complete in their folders, and a re-run does the "
                   "others" if task == "detect_many" else "no output was written")
        raise QgsProcessingException(f"GeoChange: cancelled by the user; the engine process {how} and {written}.")
    if error is None:
        raise QgsProcessingException(_crash_message(task, returncode, python, stderr_tail))
    if error.kind == contracts.MISSING_DEPENDENCY:
        raise QgsProcessingException(missing_dependency_message(error, origin))
    if error.traceback:
        feedback.reportError(error.traceback)
    raise QgsProcessingException(parameter_names(error.message, options))
