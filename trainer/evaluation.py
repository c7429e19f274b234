"""Validation and test metrics of a split: global and per image (the engine's ``ConfusionMeter``, shared
with ``geochange evaluate``), plus the same figures per ground-truth CAR bin (the MTKD paper's Fig. 8).

Images are predicted whole, as the papers test (the engine's ``Predictor`` pads them to a multiple of
32), through the prediction path of ``geochange evaluate``. Test-time augmentation is the engine's
(``Predictor(tta=...)``: the change probability averaged over scales x (identity, horizontal flip), as
Open-CD's TTA does).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from geochange.engine.evaluate import predict_image
from geochange.engine.metrics import ConfusionMeter, format_metric
from geochange.engine.package import ModelPackage, RouterPackage
from geochange.engine.predictor import Predictor
from geochange.engine.routing import RouterPredictor, change_area_ratio, route
from geochange.trainer.data import IGNORE, Item

PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # raw (bands, H, W) x 2 -> probability (H, W)

METRIC_DEFINITION = ("global: TP/FP/TN/FN summed over the split, then per class and the mean of both "
                     "classes (mIoU, mF1 ...), as the papers report; per_image: each image's scores, "
                     "averaged (the JL1-CD competition's way); car_bins: the same per ground-truth CAR bin")


def predictor_for(model: torch.nn.Module, manifest: dict, device, tta: dict | None = None,
                  sar_db: bool = False) -> Predictor:
    """The engine's predictor around an in-memory model (it normalises as the manifest says; float SAR in dB with
    ``sar_db``, the config's ``data.sar_db``)."""
    return Predictor(ModelPackage(model=model, manifest=manifest), device, tta=tta, sar_db=sar_db)


def whole_image(predictor) -> PredictFn:
    """Images predicted whole, as the papers test and as ``geochange evaluate`` predicts images that fit
    its tile (``engine.evaluate.predict_image``)."""
    return lambda pre, post: predict_image(predictor, pre, post)


def test_tta(test: dict) -> dict | None:
    """The test-time augmentation the config's ``test`` section asks for (None: none)."""
    return {"scales": test["scales"], "flip": test["flip"]} if test["tta"] else None


def test_predictor(package: ModelPackage | RouterPackage, device, test: dict,
                   sar_db: bool = False) -> Predictor | RouterPredictor:
    """The predictor of the trainer's test: a package (or an O-P router) with the TTA ``test`` asks for (float SAR
    in dB with ``sar_db``)."""
    tta = test_tta(test)

    def make(member: ModelPackage) -> Predictor:
        return Predictor(member, device, tta=tta, sar_db=sar_db)
    return RouterPredictor(package, make) if isinstance(package, RouterPackage) else make(package)


def test_predictions(predictor, items: list[Item], test: dict, car_thresholds) -> dict:
    """The trainer's test: ``evaluate_items`` with whole images through a ``test_predictor`` (its TTA is
    recorded in the summary, as are the images tested)."""
    summary = evaluate_items(whole_image(predictor), items, car_thresholds)
    summary["tta"] = test_tta(test)
    return summary


def car_bins(thresholds) -> list[str]:
    edges = [0, *thresholds, 1]
    return [f"[{lo:g}, {hi:g}{']' if i == len(edges) - 2 else ')'}" for i, (lo, hi) in
            enumerate(zip(edges[:-1], edges[1:]))]


def evaluate_items(predict: PredictFn, items: list[Item], car_thresholds=(0.05, 0.2),
                   threshold: float = 0.5) -> dict:
    """Metrics of ``predict`` on ``items``: the ``ConfusionMeter`` summary plus ``car_bins``."""
    meter = ConfusionMeter()
    names = car_bins(car_thresholds)
    per_bin = {name: ConfusionMeter() for name in names}
    for item in items:
        pre, post, label = item.load()
        prob = predict(pre, post)
        valid = label != IGNORE
        cm_args = (prob > threshold, label == 1, valid)
        meter.add(*cm_args)
        car = change_area_ratio(label == 1, valid)
        per_bin[names[int(route(car, car_thresholds))]].add(*cm_args)
    summary = meter.summary()
    summary["car_bins"] = {name: m.summary() for name, m in per_bin.items() if m.matrices}
    summary["files"] = [item.id for item in items]
    summary["definition"] = METRIC_DEFINITION
    return summary


def format_car_table(summary: dict) -> str:
    """Per-CAR-bin table: images, global mIoU / F1 / mF1 and per-image mIoU of each bin."""
    lines = [f"{'CAR bin':<14}{'images':>7}{'mIoU':>8}{'F1':>8}{'mF1':>8}{'mIoU/img':>10}"]
    for name, s in summary["car_bins"].items():
        g = s["global"]
        lines.append(f"{name:<14}{s['images']:>7}" + "".join(format_metric(g[k], 8) for k in ("mIoU", "f1", "mF1"))
                     + format_metric(s["per_image"]["mIoU"], 10))
    return "\n".join(lines)
