"""The engine as a child process: one JSON job on stdin, JSON lines on stdout.

    echo '{"task": "info", "args": {"model": "m.safetensors"}}' | python -m geochange.engine.worker

Front ends that must survive whatever the engine does (QGIS) run it this way: a segfault or a CUDA
fault kills only this process, and the GPU memory is given back when it exits. Lines written on
stdout, one JSON object each:

    {"progress": 42.0}                  percent done
    {"log": "text"}                     a line for the user
    {"result": {...}}                   the task's answer (last line, exit status 0)
    {"error": "text", "kind": "..."}    the engine's message (last line, exit status 2; 1 for a bug,
                                        with "traceback"); a missing dependency adds "missing"
                                        and "python", a cancel adds "cancelled": true

SIGTERM cancels (``progress.cancel_on_sigterm``): no temporary output is left behind. Only the
standard library (and the engine's stdlib-only errors and progress modules) is imported at module
level, so that missing dependencies are reported as such instead of as an import traceback.
"""
from __future__ import annotations

import faulthandler
import importlib
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

from geochange.engine.errors import Cancelled, GeoChangeError
from geochange.engine.progress import Progress, cancel_on_sigterm

# Modules each task imports (directly or through the engine), and the pip name of those named otherwise.
ENGINE = ("numpy", "torch", "timm", "safetensors", "rasterio", "shapely", "scipy", "pyproj", "osgeo")
NEEDS = {
    "detect": ENGINE,
    "vectorize": ("numpy", "rasterio", "shapely", "scipy", "pyproj", "osgeo"),
    "evaluate": ENGINE,
    "info": ("torch", "timm", "safetensors"),
}
PIP_NAMES = {"skimage": "scikit-image", "osgeo": "GDAL", "yaml": "pyyaml", "numpy": "numpy<2"}


class _Emitter:
    """Writes protocol lines to a private copy of stdout; fd 1 itself is pointed at stderr, so that
    anything a library prints (from Python or C) cannot corrupt the protocol."""

    def __init__(self):
        import threading

        self._lock = threading.Lock()
        self._out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def __call__(self, **message) -> None:
        line = json.dumps(message, default=str) + "\n"
        with self._lock:  # training progress comes from a second thread
            self._out.write(line)
            self._out.flush()


def missing_modules(task: str, needs: dict = NEEDS) -> dict[str, str]:
    """{module: why} for the engine's dependencies that are absent here (all of them, so that one
    message lists everything to install) or, for the task's own, that fail to import."""
    missing = {}
    for name in dict.fromkeys(m for modules in needs.values() for m in modules):
        if importlib.util.find_spec(name) is None:
            missing[name] = "not installed"
    for name in needs[task]:
        if name not in missing:
            try:
                importlib.import_module(name)
            except Exception as e:  # a broken install (ABI mismatch...) counts as missing, with its reason
                missing[name] = f"{type(e).__name__}: {e}"
    return missing


def json_progress(emit):

    class JsonProgress(Progress):
        def update(self, done: int, total: int) -> None:
            if total > 0:
                emit(progress=round(100.0 * done / total, 3))

        def log(self, message: str) -> None:
            emit(log=message)

    return JsonProgress()


def run_detect(args: dict, emit) -> dict:
    from geochange.engine.inference import detect
    from geochange.engine.package import describe_model

    args = dict(args)
    emit(log=f"model {Path(args['model']).name}:\n{describe_model(args['model'])['text']}")
    result = detect(args.pop("pre"), args.pop("post"), args.pop("model"), progress=json_progress(emit), **args)
    return {"probability": str(result.probability), "mask": str(result.mask),
            "polygons": str(result.polygons), "polygon_count": result.polygon_count,
            "changed_area_m2": result.changed_area_m2, "area_unit": "m²" if result.grid.crs is not None else "px"}


def run_vectorize(args: dict, emit) -> dict:
    from geochange.engine.vectorize import vectorize_probability

    args = dict(args)
    return vectorize_probability(args.pop("probability"), args.pop("polygons"), progress=json_progress(emit),
                                 **args)


def run_evaluate(args: dict, emit) -> dict:
    from geochange.engine.evaluate import evaluate_folder
    from geochange.engine.package import describe_model, load_package

    args = dict(args)
    model = args.pop("model")
    emit(log=f"model {Path(model).name}:\n{describe_model(model)['text']}")
    summary = evaluate_folder(load_package(model), args.pop("data"), progress=json_progress(emit), **args)
    return summary


def run_info(args: dict, emit) -> dict:
    from geochange.engine.package import describe_model

    return describe_model(args["model"])


TASKS = {"detect": run_detect, "vectorize": run_vectorize, "evaluate": run_evaluate, "info": run_info}


def _engine_origin() -> str:
    import geochange

    return str(Path(geochange.__file__).resolve().parent)


def main(tasks: dict = TASKS, needs: dict = NEEDS) -> int:
    """Serve one job; layers above the engine (the trainer) call this with their own tasks added."""
    emit = _Emitter()
    faulthandler.enable()  # a segfault prints the Python stack on stderr before the process dies
    cancel_on_sigterm()
    try:
        job = json.loads(sys.stdin.read())
        task, args = job["task"], job.get("args", {})
        if task not in tasks:
            emit(error=f"unknown task {task!r}; known: {', '.join(tasks)}", kind="ValueError")
            return 2
        missing = missing_modules(task, needs)
        if missing:
            emit(error=f"missing Python packages: {', '.join(missing)}", kind="MissingDependency",
                 missing={m: {"pip": PIP_NAMES.get(m, m), "reason": why} for m, why in missing.items()},
                 python=sys.executable, version=sys.version.split()[0],
                 venv=sys.prefix != sys.base_prefix)
            return 2
        emit(log=f"GeoChange engine {_engine_origin()} on Python {sys.version.split()[0]} ({sys.executable})")
        emit(result=tasks[task](args, emit))
        return 0
    except Exception as e:
        if isinstance(e, GeoChangeError):
            emit(error=str(e), kind=type(e).__name__, cancelled=isinstance(e, Cancelled))
            return 2
        emit(error=f"{type(e).__name__}: {e}", kind=type(e).__name__, traceback=traceback.format_exc())
        return 1


if __name__ == "__main__":
    sys.exit(main())
