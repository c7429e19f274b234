"""Training augmentation of a pair and its label, as the authors' Open-CD pipelines do it.

In this order, every random draw from the sample's own generator (so a sample's augmentation depends on
the seed and its stream position only):

1. rotation (probability ``rotate.prob``, angle uniform in +-``degrees``; image padding 0, label padding
   :data:`~geochange.trainer.data.IGNORE`), else, with probability ``rot_flip``, rot90 x k plus a flip
   (Open-CD's RandomRotFlip); the same geometry for A, B and the label;
2. random crop to ``crop.size`` (up to 10 draws until no class covers more than ``cat_max_ratio`` of the
   labelled pixels); smaller images are padded (image 0, label ignored);
3. horizontal and vertical flips;
4. exchange of the dates (never for optical-SAR pairs);
5. photometric distortion of each date on its own (mmseg's PhotoMetricDistortion: brightness, contrast
   before or after, saturation, hue, each with probability ``prob``), in 0-255 units of the date's
   scaling. Saturation and hue need three bands and leave other dates alone (for a grey SAR band
   replicated to RGB, as the authors feed it, they change nothing either).

Differences from mmseg: values stay float (mmseg rounds to uint8 after each photometric step).
"""
from __future__ import annotations

import numpy as np
from skimage.color import hsv2rgb, rgb2hsv
from skimage.transform import rotate

from geochange.trainer.data import IGNORE


class Augment:
    def __init__(self, cfg: dict):
        self.cfg = cfg

    def __call__(self, pre: np.ndarray, post: np.ndarray, label: np.ndarray, inputs: dict,
                 rng: np.random.Generator):
        """``(bands, H, W)`` raw dates and the ``(H, W)`` label -> augmented float32 dates and uint8 label."""
        cfg = self.cfg
        pre, post = pre.astype(np.float32), post.astype(np.float32)
        rotated = rng.random() < cfg["rotate"]["prob"]
        if rotated:
            angle = rng.uniform(-cfg["rotate"]["degrees"], cfg["rotate"]["degrees"])
            pre, post = (_rotate(x, angle, order=1, fill=0) for x in (pre, post))
            label = _rotate(label[None], angle, order=0, fill=IGNORE)[0].astype(np.uint8)
        elif rng.random() < cfg["rot_flip"]:
            k, axis = int(rng.integers(4)), int(rng.integers(2))
            pre, post, label = (np.flip(np.rot90(x, k, axes=(-2, -1)), axis=x.ndim - 2 + axis)
                                for x in (pre, post, label))
        pre, post, label = _random_crop(pre, post, label, cfg["crop"]["size"], cfg["crop"]["cat_max_ratio"], rng)
        for prob, axis in ((cfg["flip"]["horizontal"], -1), (cfg["flip"]["vertical"], -2)):
            if rng.random() < prob:
                pre, post, label = (np.flip(x, axis=axis) for x in (pre, post, label))
        if rng.random() < cfg["exchange"]:
            pre, post = post, pre
        pre = _photometric(pre, cfg["photometric"], float(inputs["pre"]["scale"]) / 255.0, rng)
        post = _photometric(post, cfg["photometric"], float(inputs["post"]["scale"]) / 255.0, rng)
        return (np.ascontiguousarray(pre, dtype=np.float32), np.ascontiguousarray(post, dtype=np.float32),
                np.ascontiguousarray(label, dtype=np.uint8))


def _rotate(image: np.ndarray, angle: float, order: int, fill: float) -> np.ndarray:
    """Rotate ``(bands, H, W)`` about its centre, keeping its size."""
    out = rotate(np.moveaxis(image, 0, -1).astype(np.float32), angle, order=order, mode="constant",
                 cval=fill, preserve_range=True)
    return np.moveaxis(out, -1, 0)


def _random_crop(pre, post, label, size: int, cat_max_ratio: float, rng):
    h, w = label.shape
    ch, cw = min(size, h), min(size, w)

    def draw():
        return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))

    top, left = draw()
    if cat_max_ratio < 1:
        # As mmseg: up to 10 checked draws; after that the 11th draw is taken unchecked.
        for _ in range(10):
            values, counts = np.unique(label[top:top + ch, left:left + cw], return_counts=True)
            counts = counts[values != IGNORE]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    pre, post, label = (x[..., top:top + ch, left:left + cw] for x in (pre, post, label))
    if (ch, cw) != (size, size):
        pad = ((0, size - ch), (0, size - cw))
        pre, post = (np.pad(x, ((0, 0), *pad)) for x in (pre, post))
        label = np.pad(label, pad, constant_values=IGNORE)
    return pre, post, label


def _photometric(image: np.ndarray, cfg: dict, unit: float, rng) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on one date, in 0-255 units (``unit`` = raw value of 1/255)."""
    x = image / unit
    p = cfg["prob"]

    def contrast(x):
        return np.clip(x * rng.uniform(*cfg["contrast"]), 0, 255) if rng.random() < p else x

    if rng.random() < p:
        x = np.clip(x + rng.uniform(-cfg["brightness"], cfg["brightness"]), 0, 255)
    contrast_first = rng.random() < 0.5
    if contrast_first:
        x = contrast(x)
    if x.shape[0] == 3:
        saturate, shift = rng.random() < p, rng.random() < p
        if saturate or shift:
            hsv = rgb2hsv(np.moveaxis(x / 255.0, 0, -1))
            if saturate:
                hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*cfg["saturation"]), 0, 1)
            if shift:  # OpenCV's hue has 180 steps per turn
                hsv[..., 0] = (hsv[..., 0] + rng.integers(-int(cfg["hue"]), int(cfg["hue"]), endpoint=True) / 180.0) % 1
            x = np.moveaxis(hsv2rgb(hsv), -1, 0) * 255.0
    if not contrast_first:
        x = contrast(x)
    return x * unit
