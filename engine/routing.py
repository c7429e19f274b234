"""O-P inference (the MTKD paper's original-model partitioning) and the change-area ratio it routes by.

Window by window: the original model M_O predicts; the changed share of its binary prediction is the
window's change-area ratio (CAR); the first teacher whose ``max_car`` is >= CAR (the authors' test code
compares with <=), else the last one, gives the window's prediction. Blending is as usual. The trainer
partitions its samples by the same CAR, of their labels, with < (``route``).
"""
from __future__ import annotations

import numpy as np
import torch

from geochange.engine.package import RouterPackage


def change_area_ratio(changed, valid) -> torch.Tensor:
    """CAR: changed pixels over valid pixels, per sample over the last two axes (0 where none is valid)."""
    changed, valid = torch.as_tensor(changed), torch.as_tensor(valid)
    return (changed & valid).flatten(-2).sum(-1).double() / valid.flatten(-2).sum(-1).clamp(min=1).double()


def route(car: torch.Tensor, thresholds, inclusive: bool = False) -> torch.Tensor:
    """Partition index of each CAR: the first threshold above it (training: CAR < t), or at or above
    it with ``inclusive`` (O-P inference: CAR <= t); past the last threshold, the last partition."""
    # Thresholds in the CAR's own precision: a float32 CAR of exactly 0.05 equals float32 0.05.
    bounds = torch.tensor(list(thresholds), dtype=car.dtype, device=car.device)
    return torch.bucketize(car, bounds, right=not inclusive)


class RouterPredictor:
    """O-P inference over a batch of windows, with the interface of ``Predictor``."""

    def __init__(self, router: RouterPackage, make_predictor):
        self.router = router
        self.original = make_predictor(router.original)
        self.teachers = [make_predictor(package) for _, package in router.teachers]
        self.device = self.original.device
        self.routed = np.zeros(len(self.teachers), np.int64)  # windows per teacher, for the report

    def __call__(self, pre: np.ndarray, post: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """As ``Predictor``; a window's change-area ratio counts its ``valid`` pixels only (all if None)."""
        first = self.original(pre, post)
        changed = first > self.router.threshold
        car = change_area_ratio(changed, np.ones_like(changed) if valid is None else valid)
        which = route(car, self.router.thresholds, inclusive=True).numpy()
        out = np.empty_like(first)
        for i, teacher in enumerate(self.teachers):
            index = np.flatnonzero(which == i)
            if len(index):
                out[index] = teacher(pre[index], post[index])
                self.routed[i] += len(index)
        return out
