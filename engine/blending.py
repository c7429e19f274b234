"""Blending overlapping window predictions into one seamless probability.

Each window's prediction is weighted by ``blend_weights`` (1 inside, a raised-cosine ramp on the sides
that face a neighbouring window) and summed; ``RowBlender`` keeps those sums for the rows a later window
may still touch and releases the rows no later window can reach, divided by their total weight.
"""
from __future__ import annotations

import numpy as np
from rasterio.windows import Window

from geochange.engine.windows import WindowPlan


def _ramp(length: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """1-D weights: 1 inside, a raised-cosine ramp on each end that faces another tile.

    The outer ``overlap // 4`` pixels of a ramped end get weight 0 (they see the tile's zero
    padding), the next ``overlap - 2 * (overlap // 4)`` rise as sin^2. Two facing ramps of a regular
    overlap sum to exactly 1, and every pixel keeps a positive total weight.
    """
    weights = np.ones(length, dtype=np.float64)
    if overlap <= 0:
        return weights
    margin = overlap // 4
    rise = overlap - 2 * margin
    d = np.arange(length, dtype=np.float64)
    ramp = np.sin(0.5 * np.pi * np.clip((d - margin + 0.5) / rise, 0.0, 1.0)) ** 2
    if ramp_start:
        weights = np.minimum(weights, ramp)
    if ramp_end:
        weights = np.minimum(weights, ramp[::-1])
    return weights


def blend_weights(window: Window, plan: WindowPlan) -> np.ndarray:
    """2-D float32 weights of ``window``: ramps only on sides that face a neighbouring tile."""
    top, left = int(window.row_off), int(window.col_off)
    h, w = int(window.height), int(window.width)
    along_rows = _ramp(h, plan.overlap, top > 0, top + h < plan.height)
    along_cols = _ramp(w, plan.overlap, left > 0, left + w < plan.width)
    return np.outer(along_rows, along_cols).astype(np.float32)


class RowBlender:
    """Weighted sums of overlapping window predictions for the rows not yet released."""

    def __init__(self, plan: WindowPlan, top: int = 0):
        self.plan, self.top = plan, top
        shape = (min(plan.tile, plan.height), plan.width)
        self.weighted = np.zeros(shape, np.float32)
        self.weight = np.zeros(shape, np.float32)
        self.valid = np.zeros(shape, bool)

    def add(self, window, probability: np.ndarray | None, valid: np.ndarray) -> None:
        rows = slice(int(window.row_off) - self.top, int(window.row_off + window.height) - self.top)
        cols = slice(int(window.col_off), int(window.col_off + window.width))
        self.valid[rows, cols] |= valid
        if probability is not None:
            w = blend_weights(window, self.plan)
            self.weighted[rows, cols] += probability * w
            self.weight[rows, cols] += w

    def release(self, upto: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Rows ``top .. upto``: (first row, probability with NaN where nothing ran, valid)."""
        n, start = upto - self.top, self.top
        with np.errstate(invalid="ignore", divide="ignore"):
            prob = np.where(self.weight[:n] > 0, self.weighted[:n] / self.weight[:n], np.nan).astype(np.float32)
        valid = self.valid[:n].copy()
        for buffer in (self.weighted, self.weight, self.valid):
            keep = len(buffer) - n
            buffer[:keep] = buffer[n:].copy()
            buffer[keep:] = 0
        self.top = upto
        return start, prob, valid
