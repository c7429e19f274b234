"""The engine as a child process: one JSON job on stdin, JSON lines on stdout (``engine.contracts``).

    echo '{"task": "info", "args": {"model": "m.safetensors"}}' | python -m geochange.engine.worker

Front ends that must survive whatever the engine does (QGIS) run it this way: a segfault or a CUDA
fault kills only this process, and the GPU memory is given back when it exits. The tasks that run a
model first tune the process as the command line does (``engine.process``).

SIGTERM cancels (``progress.cancel_on_sigterm``): no temporary output is left behind. Only the
standard library (and the engine's stdlib-only errors, progress and contracts modules) is imported at
module level, so that missing dependencies are reported as such instead of as an import traceback.
"""
from __future__ import annotations

import faulthandler
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path

from geochange.engine.contracts import (
    MISSING_DEPENDENCY,
    EngineError,
    log_line,
    progress_line,
    read_job,
    result_line,
)
from geochange.engine.errors import Cancelled, GeoChangeError
from geochange.engine.progress import Progress, raise_if_stopped, sigterm_cancels

# Modules each task imports (directly or through the engine), and the pip name of those named otherwise.
ENGINE = ("numpy", "torch", "timm", "safetensors", "rasterio", "shapely", "scipy", "pyproj", "osgeo")
NEEDS = {
    "detect": ENGINE,
    "vectorize": ("numpy", "rasterio", "shapely", "scipy", "pyproj", "osgeo"),
    "evaluate": ENGINE,
    "info": ("torch", "timm", "safetensors"),
    "assess": ("numpy", "rasterio", "shapely", "scipy", "pyproj", "osgeo"),
    "check": ENGINE,
    "detect_many": (*ENGINE, "dask", "distributed"),
}
PIP_NAMES = {"skimage": "scikit-image", "osgeo": "GDAL", "yaml": "pyyaml", "numpy": "numpy<2"}


class _Emitter:
    """Writes protocol lines (made by ``engine.contracts``) to a private copy of stdout; fd 1 itself is
    pointed at stderr, so that anything a library prints (from Python or C) cannot corrupt the protocol."""

    def __init__(self):
        import threading

        self._lock = threading.Lock()
        self._out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    def __call__(self, line: str) -> None:
        with self._lock:  # training progress comes from a second thread
            self._out.write(line + "\n")
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
                emit(progress_line(done, total))

        def log(self, message: str) -> None:
            emit(log_line(message))

    return JsonProgress()


def run_detect(args: dict, emit) -> dict:
    from geochange.engine.detect import detect
    from geochange.engine.package import describe_model
    from geochange.engine.process import configure_process

    args = dict(args)
    configure_process(threads=args.pop("threads", None))
    emit(log_line(f"model {Path(args['model']).name}:\n{describe_model(args['model'])['text']}"))
    result = detect(args.pop("pre"), args.pop("post"), args.pop("model"), progress=json_progress(emit),
                    size_gdal_cache=True, **args)
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
    from geochange.engine.process import configure_process

    configure_process()
    args = dict(args)
    model = args.pop("model")
    emit(log_line(f"model {Path(model).name}:\n{describe_model(model)['text']}"))
    summary = evaluate_folder(load_package(model), args.pop("data"), progress=json_progress(emit), **args)
    return summary


def run_assess(args: dict, emit) -> dict:
    from geochange.engine.assess import assess

    args = dict(args)
    return assess(args.pop("prediction"), args.pop("reference"), progress=json_progress(emit), **args)


def run_info(args: dict, emit) -> dict:
    from geochange.engine.package import describe_model

    return describe_model(args["model"])


def run_check(args: dict, emit) -> dict:
    """What an environment gives the engine (the set-up's last step), once its dependencies have imported."""
    import torch

    return {"python": sys.executable, "torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def run_detect_many(args: dict, emit) -> dict:
    """``detect-many``: the pairs of a CSV file (``table``) or of two glob patterns; returns the summary's
    files, the pairs counted by status and the failed pairs' errors."""
    from collections import Counter

    from geochange.engine.contracts import PAIR_FAILED, SUMMARY_FILES
    from geochange.engine.many import detect_many
    from geochange.engine.pairs import pairs_from

    args = dict(args)
    table = args.pop("table", None)
    pairs = pairs_from(table, args.pop("pre_glob", None), args.pop("post_glob", None))
    out = Path(args.pop("out"))
    rows = detect_many(pairs, args.pop("model"), out, listed_in=table, progress=json_progress(emit), **args)
    return {"summary": str(out / SUMMARY_FILES[0]), "table": str(out / SUMMARY_FILES[1]),
            "counts": dict(Counter(row["status"] for row in rows)),
            "failed": {row["name"]: row["error"] for row in rows if row["status"] == PAIR_FAILED}}


TASKS = {"detect": run_detect, "vectorize": run_vectorize, "evaluate": run_evaluate, "info": run_info,
         "assess": run_assess, "check": run_check, "detect_many": run_detect_many}


def _engine_origin() -> str:
    import geochange

    return str(Path(geochange.__file__).resolve().parent)


def main(tasks: dict = TASKS, needs: dict = NEEDS) -> int:
    """Serve one job; layers above the engine (the trainer) call this with their own tasks added."""
    emit = _Emitter()
    faulthandler.enable()  # a segfault prints the Python stack on stderr before the process dies
    with sigterm_cancels(program=True):  # the job over, a SIGTERM ends the process as by default
        try:
            task, args = read_job(sys.stdin.read())
            if task not in tasks:
                emit(EngineError(f"unknown task {task!r}; known: {', '.join(tasks)}", "ValueError").line())
                return 2
            missing = missing_modules(task, needs)
            if missing:
                emit(EngineError(f"missing Python packages: {', '.join(missing)}", MISSING_DEPENDENCY,
                                 missing={m: {"pip": PIP_NAMES.get(m, m), "reason": why} for m, why in missing.items()},
                                 python=sys.executable, version=sys.version.split()[0],
                                 venv=sys.prefix != sys.base_prefix).line())
                return 2
            emit(log_line(f"GeoChange engine {_engine_origin()} on Python {sys.version.split()[0]} ({sys.executable})"))
            try:
                emit(result_line(tasks[task](args, emit)))
            except Exception:
                raise_if_stopped()  # a cancel that a library turned into its own error
                raise
            return 0
        except Exception as e:
            if isinstance(e, GeoChangeError):
                emit(EngineError(str(e), type(e).__name__, cancelled=isinstance(e, Cancelled)).line())
                return 2
            emit(EngineError(f"{type(e).__name__}: {e}", type(e).__name__, traceback=traceback.format_exc()).line())
            return 1


if __name__ == "__main__":
    sys.exit(main())
