"""A finished run into the model zoo: its best package with the weights stored in fp16 (half the bytes;
loaded as fp32), what it is for, the licence of its data and its recipe, checked against the run's own
test figures before it is recorded in ``zoo/index.json``.

    geochange export RUN_DIR NAME --task "flood: optical before, SAR after" --data-licence "..." [--zoo DIR]

NAME is the package's file name in the zoo and what ``engine.zoo.resolve_model`` takes as a model's name: letters,
digits, ``_ . -``, not first a dot (a hidden file) nor ending in ``.safetensors`` (read as a file's path).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from geochange.engine.atomic import atomic_path
from geochange.engine.package import load_package, read_tensors, write_package
from geochange.engine.zoo import INDEX, ZOO, sha256, zoo_index
from geochange.trainer.config import ConfigError
from geochange.trainer.data import build_splits
from geochange.trainer.evaluation import test_predictions, test_predictor

# fp16 weights may move a test figure by rounding; more than this and the package is not exported.
FP16_TOLERANCE = 0.002
CHECKED = ("f1", "iou", "mIoU", "oa")
CHECK_EVERY = 10
NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def fp16_moves(measured: dict, tested: dict) -> dict:
    """How far each of ``CHECKED`` moved from the run's test figures (``results.json``'s ``global``, where an
    undefined figure is null) to the fp16 weights' (NaN where undefined): 0 where both are undefined, NaN where
    only one is, which no tolerance accepts."""
    def figure(value) -> float:
        return math.nan if value is None else float(value)

    moves = {}
    for key in CHECKED:
        now, then = figure(measured[key]), figure(tested[key])
        moves[key] = 0.0 if math.isnan(now) and math.isnan(then) else now - then
    return moves


def check_figures(package, cfg: dict) -> dict:
    """F1 on every tenth test tile, tested as the run was: a check quick enough for every test run that
    the shipped weights still give what they gave."""
    items = build_splits(cfg["data"]["datasets"])["test"][::CHECK_EVERY]
    predictor = test_predictor(package, "cpu", cfg["test"], cfg["data"].get("sar_db", False))
    summary = test_predictions(predictor, items, cfg["test"], cfg["train"]["car_thresholds"])
    return {"tiles": [item.id for item in items], "f1": summary["global"]["f1"]}


def check_name(name: str, zoo: Path, replace: bool) -> None:
    """``name`` must be a zoo name (``NAME``; a path such as ``a/b`` would write outside the index's folder and
    break ``geochange zoo`` for every model) and, unless ``replace``, not a model the zoo has already."""
    if not NAME.fullmatch(name) or name.endswith(".safetensors"):
        raise ConfigError(f"{name!r}: a zoo name is letters, digits, '_', '.' and '-', not first a '.' nor ending "
                          "in '.safetensors', e.g. m2cd_mit_b0_flood")
    if not replace and (name in zoo_index(zoo) or (zoo / f"{name}.safetensors").exists()):
        raise ConfigError(f"{name}: the zoo {zoo} has a model of this name already; give --replace to replace it, "
                          "or another name")


def read_results(run: Path) -> dict:
    """The test figures of the finished run ``run`` (its ``results.json``)."""
    path = run / "results.json"
    if not path.is_file():
        raise ConfigError(f"{run}: no results.json; only a finished run (tested) can go into the zoo")
    try:
        results = json.loads(path.read_text())
    except ValueError as e:  # not JSON, or not UTF-8 text
        raise ConfigError(f"{path}: not a run's results, the file is corrupt ({e}); export a run that "
                          "finished") from None
    if not isinstance(results, dict) or "test" not in results:
        raise ConfigError(f"{path}: not a run's results (no test figures); export a run that finished")
    return results["test"]


def export_run(run_dir: str | Path, name: str, *, task: str, data_licence: str, gsd: float | None = None,
               zoo: Path = ZOO, replace: bool = False) -> dict:
    """Write ``zoo/NAME.safetensors`` from ``run_dir``'s best package and record it in the index (an existing
    model of that name only with ``replace``); returns the record. The fp16 package is tested on the run's test
    split as the run was tested, and refused if any of ``CHECKED`` moves by more than ``FP16_TOLERANCE``."""
    run = Path(run_dir)
    check_name(name, zoo, replace)
    tested = read_results(run)
    if not tested:
        raise ConfigError(f"{run}: the run has no test figures (an empty test split)")
    package = load_package(run / "best.safetensors")
    manifest = package.manifest
    manifest["task"] = task
    # Runs made before packages recorded their tile: the crop they were trained on.
    manifest.setdefault("tile", manifest["training"]["config"]["augment"]["crop"]["size"])
    gsd = gsd if gsd is not None else manifest["training"]["config"]["data"].get("gsd")
    if gsd is not None:
        if not gsd > 0:
            raise ConfigError(f"--gsd: metres per pixel must be above 0, not {gsd:g}")
        manifest["gsd"] = float(gsd)
    manifest["licence"] = f"weights: this project's; data: {data_licence}"
    tensors = {k: v.half() if v.dtype == torch.float32 else v
               for k, v in read_tensors(run / "best.safetensors").items()}
    path = zoo / f"{name}.safetensors"
    trial = write_package(tensors, manifest, zoo / f".{name}.export.safetensors")  # the zoo's file stays until checked
    try:
        half = load_package(trial)
        cfg = manifest["training"]["config"]
        measured = test_predictions(test_predictor(half, "cpu", cfg["test"], cfg["data"].get("sar_db", False)),
                                    build_splits(cfg["data"]["datasets"])["test"], cfg["test"],
                                    cfg["train"]["car_thresholds"])
        moved = fp16_moves(measured["global"], tested["global"])
        if not all(abs(v) <= FP16_TOLERANCE for v in moved.values()):  # NaN: a figure undefined on one side
            raise ConfigError(f"{name}: fp16 weights move the test figures by {moved} (at most "
                              f"{FP16_TOLERANCE}); not exported")
        manifest["training"]["metrics"]["test"] = measured  # the figures of the weights shipped
        manifest["training"]["metrics"]["check"] = check_figures(half, cfg)
        write_package(tensors, manifest, path)
    finally:
        trial.unlink(missing_ok=True)
    record = {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256(path)}
    with atomic_path(zoo / INDEX) as tmp:
        tmp.write_text(json.dumps({**zoo_index(zoo), name: record}, indent=2, sort_keys=True) + "\n")
    return record
