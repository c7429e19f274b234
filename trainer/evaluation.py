"""Validation and test metrics of a split: global and per image (the engine's ``ConfusionMeter``, shared
with ``geochange evaluate``), plus the same figures per ground-truth CAR bin (the MTKD paper's Fig. 8).

Images are predicted whole, as the papers test (the engine's ``Predictor`` pads them to a multiple of
32). Test-time augmentation averages the change probability over scales x (identity, horizontal flip),
as Open-CD's TTA does.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from geochange.engine.metrics import ConfusionMeter
from geochange.engine.package import ModelPackage
from geochange.engine.predict import Predictor
from geochange.engine.router import route
from geochange.trainer.data import IGNORE, Item, change_area_ratio

PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # raw (bands, H, W) x 2 -> probability (H, W)

METRIC_DEFINITION = ("global: TP/FP/TN/FN summed over the split, then per class and the mean of both "
                     "classes (mIoU, mF1 ...), as the papers report; per_image: each image's scores, "
                     "averaged (the JL1-CD competition's way); car_bins: the same per ground-truth CAR bin")


def predictor_for(model: torch.nn.Module, manifest: dict, device) -> Predictor:
    """The engine's predictor around an in-memory model (it normalises as the manifest says)."""
    return Predictor(ModelPackage(model=model, manifest=manifest), device)


def whole_image(predictor: Predictor) -> PredictFn:
    return lambda pre, post: predictor(pre[None], post[None])[0]


def resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(bands, H, W)`` resized bilinearly to ``size``, in its own type: the predictor scales raw values
    by their type (uint8 / 255), so a float copy of a uint8 image would be read as reflectance or as SAR
    backscatter. Integer images are rounded, as an image library resizing them does."""
    out = F.interpolate(torch.as_tensor(image, dtype=torch.float32)[None], size=size, mode="bilinear",
                        align_corners=False)[0].numpy()
    if np.issubdtype(image.dtype, np.integer):
        limits = np.iinfo(image.dtype)
        out = np.clip(np.rint(out), limits.min, limits.max)
    return out.astype(image.dtype)


def with_tta(predictor: Predictor, scales=(0.75, 1.0, 1.25), flip: bool = True) -> PredictFn:
    """Mean change probability over ``scales`` x (identity, horizontal flip)."""
    def predict(pre: np.ndarray, post: np.ndarray) -> np.ndarray:
        h, w = pre.shape[-2:]
        total = torch.zeros(h, w)
        count = 0
        for scale in scales:
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            a, b = (resized(x, size) for x in (pre, post))
            for flipped in ((False, True) if flip else (False,)):
                x_a, x_b = (np.ascontiguousarray(x[..., ::-1]) if flipped else x for x in (a, b))
                prob = torch.from_numpy(predictor(x_a[None], x_b[None]))[None]
                prob = prob.flip(-1) if flipped else prob
                total += F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
                count += 1
        return (total / count).numpy()
    return predict


def test_predictions(predictor: Predictor, items: list[Item], test: dict, car_thresholds) -> dict:
    """The trainer's test: ``evaluate_items`` with whole images, TTA as the config's ``test`` section says
    (recorded in the summary)."""
    predict = with_tta(predictor, test["scales"], test["flip"]) if test["tta"] else whole_image(predictor)
    summary = evaluate_items(predict, items, car_thresholds)
    summary["tta"] = {"scales": test["scales"], "flip": test["flip"]} if test["tta"] else None
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
        car = change_area_ratio(label)
        per_bin[names[int(route(car, car_thresholds))]].add(*cm_args)
    summary = meter.summary()
    summary["car_bins"] = {name: m.summary() for name, m in per_bin.items() if m.matrices}
    summary["definition"] = METRIC_DEFINITION
    return summary


def format_car_table(summary: dict) -> str:
    """Per-CAR-bin table: images, global mIoU / F1 / mF1 and per-image mIoU of each bin."""
    lines = [f"{'CAR bin':<14}{'images':>7}{'mIoU':>8}{'F1':>8}{'mF1':>8}{'mIoU/img':>10}"]
    for name, s in summary["car_bins"].items():
        g = s["global"]
        lines.append(f"{name:<14}{s['images']:>7}{g['mIoU']:>8.4f}{g['f1']:>8.4f}{g['mF1']:>8.4f}"
                     f"{s['per_image']['mIoU']:>10.4f}")
    return "\n".join(lines)
