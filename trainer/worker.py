"""The trainer as a child process: the engine's worker (``geochange.engine.worker``, its protocol in
``engine.contracts``) with a ``train`` task added, which QGIS's *Train a model* runs. As in the engine's
worker, only the standard library is imported before the dependency check.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import threading
from pathlib import Path

from geochange.engine.atomic import atomic_path
from geochange.engine.contracts import log_line, progress_line
from geochange.engine.worker import ENGINE, NEEDS, TASKS, main


class TrainingFollower:
    """Relays a training run's progress from another thread: the iteration counter as progress, and the
    newest rows of its logs (``train_log.csv``, ``val_log.csv`` in the work folder) as log lines."""

    def __init__(self, trainer, emit, interval_s: float = 1.0):
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
            self.emit(progress_line(done, self.total))
        for name in ("train", "val"):
            row = self._last_row(name)
            if row and self.shown[name] < int(row["iteration"]) <= done:
                self.shown[name] = int(row["iteration"])
                values = ", ".join(f"{k} {float(v):.4g}" for k, v in row.items() if k != "iteration" and v)
                self.emit(log_line(f"{'validation' if name == 'val' else 'iteration'} {row['iteration']}/{self.total}: "
                                   f"{values}"))

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._report()


def run_train(args: dict, emit) -> dict:
    """Train a config (with ``--set`` style overrides; without one, the overrides over the defaults) and copy
    the best package to ``package``."""
    from geochange.engine.errors import output_error
    from geochange.engine.process import configure_process
    from geochange.trainer.config import load
    from geochange.trainer.loop import Trainer

    # The paths given here are the caller's, relative to its working folder: made whole before it changes.
    package = Path(os.path.abspath(args["package"]))
    overrides = list(args.get("overrides", []))
    if args.get("work_dir"):
        overrides.append(f"work_dir={json.dumps(os.path.abspath(args['work_dir']))}")
    config = Path(args["config"]).resolve() if args.get("config") else None
    cfg = load(config, overrides)  # a config refused leaves no folder made for the package
    try:
        package.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise output_error(package.parent, error.strerror or str(error)) from None
    # Relative paths in the config (datasets, weights, work_dir) are taken from its folder, else the package's.
    configure_process(folder=(config or package).parent)
    trainer = Trainer(cfg)
    emit(log_line(f"training {cfg['name']} ({cfg['model']['architecture']}) for {cfg['schedule']['iterations']} "
                  f"iterations on {trainer.device}; work folder {trainer.work_dir.resolve()}"))
    with TrainingFollower(trainer, emit):
        results = trainer.fit(resume=bool(args.get("resume")), replace=bool(args.get("restart")))
    with atomic_path(package) as tmp:
        shutil.copyfile(trainer.package_path, tmp)
    return {"package": str(package), "work_dir": str(trainer.work_dir.resolve()),
            "best_iteration": results["best_iteration"],
            "val": results["val"] and results["val"]["global"], "test": results["test"] and results["test"]["global"]}


TRAINER_TASKS = {**TASKS, "train": run_train}
TRAINER_NEEDS = {**NEEDS, "train": (*ENGINE, "yaml", "tqdm", "skimage")}

if __name__ == "__main__":
    sys.exit(main(TRAINER_TASKS, TRAINER_NEEDS))
