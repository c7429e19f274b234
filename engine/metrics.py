"""Change-detection metrics, global (confusion summed over a set) and per image (averaged).

The papers report global figures (Open-CD/mmseg sum TP/FP/TN/FN over the test set); the JL1-CD
competition averages per image. Both are reported, named so. Undefined ratios (0/0, e.g. the
change-class precision of an image with neither true nor predicted change) are NaN and left out of
per-image means.
"""
from __future__ import annotations

import json
import math
import warnings

import numpy as np


def confusion(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """2x2 confusion ``[[TN, FP], [FN, TP]]`` (rows: truth) of binary ``pred`` against ``truth``.

    Pixels where ``valid`` is False (unlabelled, nodata) are left out.
    """
    if valid is not None:
        pred, truth = pred[valid], truth[valid]
    truth = truth.astype(bool)
    guess = pred.astype(bool)
    tp = np.count_nonzero(truth & guess)
    fp = np.count_nonzero(~truth & guess)
    fn = np.count_nonzero(truth & ~guess)
    tn = truth.size - tp - fp - fn
    return np.array([[tn, fp], [fn, tp]], dtype=np.int64)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def scores(cm: np.ndarray) -> dict:
    """Change-class precision/recall/F1/IoU, OA, and the means over both classes (mIoU, mF1 ...)."""
    (tn, fp), (fn, tp) = cm.tolist()
    per_class = {}
    # Class 1 (change) and class 0 (no change, i.e. the roles of the counts swapped).
    for cls, (t, f_pos, f_neg) in {1: (tp, fp, fn), 0: (tn, fn, fp)}.items():
        per_class[cls] = {
            "precision": _ratio(t, t + f_pos),
            "recall": _ratio(t, t + f_neg),
            "f1": _ratio(2 * t, 2 * t + f_pos + f_neg),
            "iou": _ratio(t, t + f_pos + f_neg),
        }
    change, unchanged = per_class[1], per_class[0]
    return {
        "precision": change["precision"], "recall": change["recall"], "f1": change["f1"],
        "iou": change["iou"], "oa": _ratio(tp + tn, tp + tn + fp + fn),
        "mIoU": np.mean([change["iou"], unchanged["iou"]]),
        "mF1": np.mean([change["f1"], unchanged["f1"]]),
        "mPrecision": np.mean([change["precision"], unchanged["precision"]]),
        "mAcc": np.mean([change["recall"], unchanged["recall"]]),
    }


def kappa(cm: np.ndarray) -> float:
    """Cohen's kappa of a confusion matrix: the agreement beyond what chance gives with the same class shares,
    ``(po - pe) / (1 - pe)``; it discounts the high OA of maps where almost nothing changed."""
    cm = np.asarray(cm, dtype=np.float64)  # the products of class totals overflow int64 past 3e9 pixels
    n = cm.sum()
    if not n:
        return float("nan")
    agreed = np.trace(cm) / n
    chance = float(np.sum(cm.sum(axis=0) * cm.sum(axis=1))) / n**2
    return _ratio(agreed - chance, 1.0 - chance)


METRIC_NAMES = ("precision", "recall", "f1", "iou", "oa", "mIoU", "mF1", "mPrecision", "mAcc")


class ConfusionMeter:
    """Accumulates one confusion matrix per image; reports global and per-image scores."""

    def __init__(self):
        self.matrices: list[np.ndarray] = []

    def add(self, pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        cm = confusion(pred, truth, valid)
        self.matrices.append(cm)
        return cm

    def summary(self) -> dict:
        if not self.matrices:
            raise ValueError("no image was evaluated")
        total = np.sum(self.matrices, axis=0)
        per_image = [scores(cm) for cm in self.matrices]
        with warnings.catch_warnings():  # a metric undefined on every image stays NaN, quietly
            warnings.simplefilter("ignore", RuntimeWarning)
            averaged = {k: float(np.nanmean([s[k] for s in per_image])) for k in METRIC_NAMES}
        (tn, fp), (fn, tp) = total.tolist()
        return {
            "images": len(self.matrices),
            "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
            "global": {k: float(v) for k, v in scores(total).items()},
            "per_image": averaged,
        }


def format_metric(value: float | None, width: int) -> str:
    """``value`` to 4 decimals, right-aligned in ``width``; a metric undefined on the data (NaN, or ``None``
    once it went through ``json_ready``, as in a package's manifest) as ``n/a``."""
    if value is None or not math.isfinite(value):
        return f"{'n/a':>{width}}"
    return f"{value:>{width}.4f}"


def format_summary(summary: dict) -> str:
    """A plain-text table of a ``ConfusionMeter.summary()``, fresh or read back from JSON."""
    c = summary["confusion"]
    lines = [f"images: {summary['images']}   TN {c['tn']}  FP {c['fp']}  FN {c['fn']}  TP {c['tp']}",
             f"{'metric':<12}{'global':>10}{'per_image':>12}"]
    for name in METRIC_NAMES:
        lines.append(f"{name:<12}{format_metric(summary['global'][name], 10)}"
                     f"{format_metric(summary['per_image'][name], 12)}")
    return "\n".join(lines)


def json_ready(value):
    """``value`` with a float that is not finite (a metric undefined on the data: NaN) as ``None``, JSON's ``null``:
    JSON has no NaN, and strict readers (jq, a browser's ``JSON.parse``) refuse Python's."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def metrics_json(data) -> str:
    """``data`` as JSON text, NaN as ``null`` (``json_ready``)."""
    return json.dumps(json_ready(data), indent=2, allow_nan=False)
