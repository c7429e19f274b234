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

SIGTERM cancels: it raises ``Cancelled`` in the main thread, so the engine's ``finally`` blocks run
and no temporary output is left behind. Only the standard library is imported at module level, so
that missing dependencies are reported as such instead of as an import traceback.
"""
from __future__ import annotations

import faulthandler
import importlib
import importlib.util
import json
import os
import signal
import sys
import traceback
from pathlib import Path

# Modules each task imports (directly or through the engine), and the pip name of those named otherwise.
ENGINE = ("numpy", "torch", "timm", "safetensors", "rasterio", "shapely", "skimage", "pyproj", "osgeo")
NEEDS = {
    "detect": ENGINE,
    "vectorize": ("numpy", "rasterio", "shapely", "skimage", "pyproj", "osgeo"),
    "evaluate": ENGINE,
    "info": ("torch", "timm", "safetensors"),
    "train": (*ENGINE, "yaml", "tqdm"),
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


def missing_modules(task: str) -> dict[str, str]:
    """{module: why} for the engine's dependencies that are absent here (all of them, so that one
    message lists everything to install) or, for the task's own, that fail to import."""
    missing = {}
    for name in dict.fromkeys(m for needs in NEEDS.values() for m in needs):
        if importlib.util.find_spec(name) is None:
            missing[name] = "not installed"
    for name in NEEDS[task]:
        if name not in missing:
            try:
                importlib.import_module(name)
            except Exception as e:  # a broken install (ABI mismatch...) counts as missing, with its reason
                missing[name] = f"{type(e).__name__}: {e}"
    return missing


def _progress(emit):
    from geochange.engine.progress import Progress

    class JsonProgress(Progress):
        def update(self, done: int, total: int) -> None:
            if total > 0:
                emit(progress=round(100.0 * done / total, 3))

        def log(self, message: str) -> None:
            emit(log=message)

    return JsonProgress()


def run_detect(args: dict, emit) -> dict:
    from geochange.engine.inference import detect
    from geochange.engine.router import describe_model

    args = dict(args)
    emit(log=f"model {Path(args['model']).name}:\n{describe_model(args['model'])['text']}")
    result = detect(args.pop("pre"), args.pop("post"), args.pop("model"), progress=_progress(emit), **args)
    return {"probability": str(result.probability), "mask": str(result.mask),
            "polygons": str(result.polygons), "polygon_count": result.polygon_count,
            "changed_area_m2": result.changed_area_m2}


def run_vectorize(args: dict, emit) -> dict:
    from geochange.engine.vectorize import vectorize_probability

    args = dict(args)
    return vectorize_probability(args.pop("probability"), args.pop("polygons"), progress=_progress(emit),
                                 **args)


def run_evaluate(args: dict, emit) -> dict:
    from geochange.engine.evaluate import evaluate_folder
    from geochange.engine.package import load_package
    from geochange.engine.router import describe_model

    args = dict(args)
    model = args.pop("model")
    emit(log=f"model {Path(model).name}:\n{describe_model(model)['text']}")
    summary = evaluate_folder(load_package(model), args.pop("data"), progress=_progress(emit), **args)
    return summary


def run_info(args: dict, emit) -> dict:
    from geochange.engine.router import describe_model

    return describe_model(args["model"])


class TrainingFollower:
    """Relays a training run's progress from another thread: the iteration counter as progress, and the
    newest rows of its logs (``train_log.csv``, ``val_log.csv`` in the work folder) as log lines."""

    def __init__(self, trainer, emit, interval_s: float = 1.0):
        import threading

        self.trainer, self.emit, self.interval_s = trainer, emit, interval_s
        self.total = trainer.cfg["schedule"]["iterations"]
        self.shown = {"train": 0, "val": 0}  # last iteration logged from each file
        self.reported = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="geochange-train-log", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._report()

    def _last_row(self, name: str) -> dict | None:
        import csv

        path = self.trainer.work_dir / f"{name}_log.csv"
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
        except (FileNotFoundError, csv.Error):
            return None
        return rows[-1] if rows else None

    def _report(self) -> None:
        done = self.trainer.iteration
        if done == 0:
            return  # before the first iteration the logs may still be an earlier run's
        if done != self.reported:
            self.reported = done
            self.emit(progress=round(100.0 * done / self.total, 3))
        for name in ("train", "val"):
            row = self._last_row(name)
            if row and self.shown[name] < int(row["iteration"]) <= done:
                self.shown[name] = int(row["iteration"])
                values = ", ".join(f"{k} {float(v):.4g}" for k, v in row.items() if k != "iteration" and v)
                self.emit(log=f"{'validation' if name == 'val' else 'iteration'} {row['iteration']}/{self.total}: "
                              f"{values}")

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._report()


def run_train(args: dict, emit) -> dict:
    """Train a config (with ``--set`` style overrides) and copy the best package to ``package``."""
    import shutil

    from geochange.engine.atomic import atomic_path
    from geochange.trainer.config import load
    from geochange.trainer.loop import Trainer

    overrides = list(args.get("overrides", []))
    if args.get("work_dir"):
        overrides.append(f"work_dir={json.dumps(str(args['work_dir']))}")
    config = Path(args["config"]).resolve()
    # Relative paths in the config (datasets, weights, work_dir) are taken from the config's folder.
    os.chdir(config.parent)
    cfg = load(config, overrides)
    trainer = Trainer(cfg)
    emit(log=f"training {cfg['name']} ({cfg['model']['architecture']}) for {cfg['schedule']['iterations']} "
             f"iterations on {trainer.device}; work folder {trainer.work_dir.resolve()}")
    with TrainingFollower(trainer, emit):
        results = trainer.fit(resume=bool(args.get("resume")))
    with atomic_path(args["package"]) as tmp:
        shutil.copyfile(trainer.package_path, tmp)
    return {"package": str(args["package"]), "work_dir": str(trainer.work_dir.resolve()),
            "best_iteration": results["best_iteration"],
            "val": results["val"] and results["val"]["global"], "test": results["test"] and results["test"]["global"]}


TASKS = {"detect": run_detect, "vectorize": run_vectorize, "evaluate": run_evaluate, "info": run_info,
         "train": run_train}


def _engine_origin() -> str:
    import geochange

    return str(Path(geochange.__file__).resolve().parent)


def _cancel_on_sigterm() -> None:
    from geochange.engine.errors import Cancelled

    def raise_cancelled(signum, frame):
        # Python runs handlers in the main thread: the exception unwinds the engine from where it is.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Cancelled("cancelled: the engine process was asked to stop")

    signal.signal(signal.SIGTERM, raise_cancelled)


def main() -> int:
    emit = _Emitter()
    faulthandler.enable()  # a segfault prints the Python stack on stderr before the process dies
    _cancel_on_sigterm()
    try:
        job = json.loads(sys.stdin.read())
        task, args = job["task"], job.get("args", {})
        if task not in TASKS:
            emit(error=f"unknown task {task!r}; known: {', '.join(TASKS)}", kind="ValueError")
            return 2
        missing = missing_modules(task)
        if missing:
            emit(error=f"missing Python packages: {', '.join(missing)}", kind="MissingDependency",
                 missing={m: {"pip": PIP_NAMES.get(m, m), "reason": why} for m, why in missing.items()},
                 python=sys.executable, version=sys.version.split()[0],
                 venv=sys.prefix != sys.base_prefix)
            return 2
        emit(log=f"GeoChange engine {_engine_origin()} on Python {sys.version.split()[0]} ({sys.executable})")
        emit(result=TASKS[task](args, emit))
        return 0
    except Exception as e:
        from geochange.engine.errors import Cancelled, GeoChangeError

        if isinstance(e, GeoChangeError):
            emit(error=str(e), kind=type(e).__name__, cancelled=isinstance(e, Cancelled))
            return 2
        emit(error=f"{type(e).__name__}: {e}", kind=type(e).__name__, traceback=traceback.format_exc())
        return 1


if __name__ == "__main__":
    sys.exit(main())
