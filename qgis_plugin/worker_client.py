"""Run an engine task in a child Python process and relay it to a Processing feedback.

QGIS never imports torch: the engine runs in the task's worker module (``engine.contracts.WORKERS``)
under an interpreter chosen by ``worker_python``. Its JSON lines (``engine.contracts``) become progress
and log messages, Cancel terminates it (SIGTERM, on which the engine removes its temporaries), its
errors become ``QgsProcessingException`` with the engine's message, and a crash (segfault, CUDA fault,
out-of-memory kill) ends only the child.
"""
from __future__ import annotations

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
from geochange.engine.atomic import remove_left_temporaries

PLUGIN_ROOT = Path(__file__).resolve().parent.parent
# QgsSettings key of the interpreter setting (Settings > Options > Processing > Providers > GeoChange).
PYTHON_SETTING = "GEOCHANGE_PYTHON"
PYTHON_SETTING_KEY = "Processing/Configuration/" + PYTHON_SETTING
PYTHON_ENV = "GEOCHANGE_PYTHON"
# Seconds a cancelled engine gets to clean up before it is killed.
CANCEL_GRACE_S = 20.0
# Loads the package ``geochange`` from this plugin's folder whatever the folder is called and whatever
# the interpreter has installed, so the engine that runs is always the plugin's own copy. ``-c`` puts
# the current folder (QGIS's, anyone's) first on sys.path: it is dropped before anything is imported,
# so that a ``json.py`` or ``concurrent.py`` there never runs. (Not ``-I``: it would also drop the
# PYTHONPATH and user site-packages that QGIS's own Python may need; not ``-P``: Python 3.11+ only.)
BOOTSTRAP = """\
import sys
if sys.path and sys.path[0] == "":
    del sys.path[0]
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


def qgis_python() -> Path:
    """The Python interpreter QGIS itself embeds (QGIS's ``sys.executable`` is often QGIS)."""
    executable = Path(sys.executable)
    if executable.name.lower().startswith("python"):
        return executable
    folder = Path(sys.base_exec_prefix)
    candidates = ([folder / "python.exe", folder / "python3.exe"] if os.name == "nt" else
                  [folder / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}",
                   folder / "bin" / "python3"])
    return next((c for c in candidates if c.exists()), candidates[-1])


def worker_python() -> tuple[Path, str]:
    """The interpreter that runs the engine and where that choice came from."""
    configured = str(QgsSettings().value(PYTHON_SETTING_KEY, "") or "").strip()
    if configured:
        return Path(configured), "the GeoChange setting 'Python interpreter for the engine'"
    if os.environ.get(PYTHON_ENV, "").strip():
        return Path(os.environ[PYTHON_ENV].strip()), f"the environment variable {PYTHON_ENV}"
    venv = PLUGIN_ROOT / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if venv.exists():
        return venv, "the .venv beside the plugin"
    return qgis_python(), "QGIS's own Python"


def _worker_environment(python: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    if python != qgis_python():
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
        "Install them into that interpreter with:",
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
    text = (f"The GeoChange engine process ({python}) {how} while running '{task}'. QGIS is unaffected and "
            "nothing was written under the output names.")
    lines = list(stderr)
    # Python's fault handler reports the crash and the stacks of its threads: quote that report.
    fatal = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error")]
    lines = [line for line in lines[fatal[-1]:] if not line.startswith("Extension modules:")] if fatal else lines
    if lines:
        text += "\nIts last error output:\n" + "\n".join(lines[:STDERR_QUOTED])
    return text


def _read_lines(stream, tag: str, lines: queue.Queue) -> None:
    for line in stream:
        lines.put((tag, line.rstrip("\n")))
    lines.put((tag, None))


def parameter_names(message: str, options: dict) -> str:
    """The engine's ``message`` with the command-line options it names (``--pre-bands``) spelt as the
    algorithm's parameters (``options``: ``{"--pre-bands": "PRE_BANDS"}``)."""
    return re.sub(r"--[a-z][a-z0-9-]*", lambda m: options.get(m.group(), m.group()), message)


def run_task(task: str, args: dict, feedback, outputs=(), options=None) -> dict:
    """Run ``task`` with ``args`` in the engine process; its result dict, or QgsProcessingException.

    ``outputs`` are the files the task writes: if the process dies without cleaning up, their
    temporaries are removed here. ``options`` maps the command-line options that engine messages
    name to the algorithm's parameters (see ``parameter_names``).
    """
    python, origin = worker_python()
    if not python.exists():
        raise QgsProcessingException(f"The Python interpreter for the GeoChange engine, {python} (chosen by "
                                     f"{origin}), does not exist.")
    try:
        process = subprocess.Popen([str(python), "-c", BOOTSTRAP, str(PLUGIN_ROOT), contracts.WORKERS[task]],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   encoding="utf-8", errors="replace", env=_worker_environment(python))
    except OSError as e:
        raise QgsProcessingException(f"Cannot start the GeoChange engine with {python} ({origin}): {e}") from e
    with process:  # closes the pipes however this ends
        return _follow(process, task, args, feedback, outputs, python, origin, options or {})


def _follow(process, task, args, feedback, outputs, python, origin, options) -> dict:
    feedback.pushDebugInfo(f"GeoChange engine process {process.pid}: {python} ({origin}), task {task}")
    lines: queue.Queue = queue.Queue()
    for stream, tag in ((process.stdout, "out"), (process.stderr, "err")):
        threading.Thread(target=_read_lines, args=(stream, tag, lines), daemon=True).start()
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
                feedback.pushInfo(value)
            elif kind == contracts.RESULT:
                result = value
            else:
                error = value
    returncode = process.wait()

    if result is not None:
        return result
    if returncode < 0 or error is None:
        remove_left_temporaries(outputs)
    if cancelled_at is not None:
        how = "stopped cleanly" if error is not None and error.cancelled else "was ended"
        raise QgsProcessingException(f"GeoChange: cancelled by the user; the engine process {how} and no "
                                     "output was written.")
    if error is None:
        raise QgsProcessingException(_crash_message(task, returncode, python, stderr_tail))
    if error.kind == contracts.MISSING_DEPENDENCY:
        raise QgsProcessingException(missing_dependency_message(error, origin))
    if error.traceback:
        feedback.reportError(error.traceback)
    raise QgsProcessingException(parameter_names(error.message, options))
