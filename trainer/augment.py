"""Training augmentation of a pair and its label, as the authors' Open-CD pipelines do it.

In this order, every random draw from the sample's own generator (so a sample's augmentation depends on
the seed and its stream position only):

1. rotation (probability ``rotate.prob``, angle uniform in +-``degrees``; image padding 0, label padding
   :data:`~geochange.trainer.data.IGNORE`, or with ``padding: reflect`` all three reflected about their
   edges, OpenCV's BORDER_REFLECT_101, as albumentations' Rotate), else, with probability ``rot_flip``,
   rot90 x k plus a flip (Open-CD's RandomRotFlip); the same geometry for A, B and the label;
2. random crop to ``crop.size`` (up to 10 draws until no class covers more than ``cat_max_ratio`` of the
   labelled pixels); smaller images are padded (image 0, label ignored);
3. horizontal and vertical flips, each with its own probability; then, with probability ``flip.any``, a
   vertical, horizontal or double flip, equally likely (albumentations' Flip);
4. exchange of the dates (the config refuses it for dates of different kinds: optical and SAR, other bands,
   type or scale);
5. photometric distortion of each date on its own (mmseg's PhotoMetricDistortion: brightness, contrast
   before or after, saturation, hue, each with probability ``prob``), in 0-255 units of the date's
   scaling, clipped to the range of the date's type (0-255 for uint8 as mmseg, 0-65535 for uint16; float
   dates not at all, whatever the scale). Saturation and hue need three bands and leave other dates alone
   (for a grey SAR band replicated to RGB, as the authors feed it, they change nothing either);
6. TinyCD's changes of each date, as albumentations does them on its float images: with probability
   ``brightness_contrast.prob``, x * (1 + c) + b * (the raw value of 1.0), c and b uniform in
   +-``contrast`` and +-``brightness``, not clipped; then with probability ``blur.prob``, a Gaussian blur
   whose size is drawn from ``blur.kernels`` (OpenCV's kernels for sigma 0, which albumentations'
   GaussianBlur asks for: 1-2-1 and 1-4-6-4-1 binomials, edges reflected as BORDER_REFLECT_101).
An option whose probability is 0 draws nothing, so configurations without it keep their random streams.

Differences from mmseg: values stay float (mmseg rounds to uint8 after each photometric step).
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import convolve1d
from skimage.color import hsv2rgb, rgb2hsv
from skimage.transform import rotate

from geochange.trainer.data import IGNORE

# OpenCV's fixed Gaussian kernels for sigma 0 at the sizes TinyCD draws (its GaussianBlur's blur_limit 3-5).
BLUR_KERNELS = {3: np.array([1, 2, 1], np.float32) / 4, 5: np.array([1, 4, 6, 4, 1], np.float32) / 16}


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
            mode = cfg["rotate"]["padding"]
            pre, post = (_rotate(x, angle, order=1, fill=0, mode=mode) for x in (pre, post))
            label = _rotate(label[None], angle, order=0, fill=IGNORE, mode=mode)[0].astype(np.uint8)
        elif rng.random() < cfg["rot_flip"]:
            k, axis = int(rng.integers(4)), int(rng.integers(2))
            pre, post, label = (np.flip(np.rot90(x, k, axes=(-2, -1)), axis=x.ndim - 2 + axis)
                                for x in (pre, post, label))
        pre, post, label = _random_crop(pre, post, label, cfg["crop"]["size"], cfg["crop"]["cat_max_ratio"], rng)
        for prob, axis in ((cfg["flip"]["horizontal"], -1), (cfg["flip"]["vertical"], -2)):
            if rng.random() < prob:
                pre, post, label = (np.flip(x, axis=axis) for x in (pre, post, label))
        if cfg["flip"]["any"] and rng.random() < cfg["flip"]["any"]:
            axes = ((-2,), (-1,), (-2, -1))[int(rng.integers(3))]
            pre, post, label = (np.flip(x, axis=axes) for x in (pre, post, label))
        if rng.random() < cfg["exchange"]:
            pre, post = post, pre
        pre = _photometric(pre, cfg["photometric"], inputs["pre"], rng)
        post = _photometric(post, cfg["photometric"], inputs["post"], rng)
        pre = _tinycd_changes(pre, cfg, float(inputs["pre"]["scale"]), rng)
        post = _tinycd_changes(post, cfg, float(inputs["post"]["scale"]), rng)
        return (np.ascontiguousarray(pre, dtype=np.float32), np.ascontiguousarray(post, dtype=np.float32),
                np.ascontiguousarray(label, dtype=np.uint8))


def _rotate(image: np.ndarray, angle: float, order: int, fill: float, mode: str) -> np.ndarray:
    """Rotate ``(bands, H, W)`` about its centre, keeping its size; corners ``fill`` or reflected."""
    out = rotate(np.moveaxis(image, 0, -1).astype(np.float32), angle, order=order, mode=mode,
                 cval=fill, preserve_range=True)  # scikit-image's "reflect" is BORDER_REFLECT_101
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


def _limits(spec: dict) -> tuple[float, float]:
    """The raw values a date of ``spec``'s type can hold: an integer type's range (0-255 for uint8, as mmseg clips),
    unbounded for float (reflectance past 1.0, or below 0, is data). Float SAR is in its spec's units by then
    (``data.in_spec_units``), so the spec's type is the one that counts."""
    dtype = np.dtype(spec.get("dtype", "uint8"))
    if dtype.kind in "iu":
        return float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    return -np.inf, np.inf


def _photometric(image: np.ndarray, cfg: dict, spec: dict, rng) -> np.ndarray:
    """mmseg's PhotoMetricDistortion on one date of input spec ``spec``, in 0-255 units of its scale, clipped to the
    range of its type (``_limits``)."""
    unit = float(spec["scale"]) / 255.0  # the raw value of 1/255
    x = image / unit
    p = cfg["prob"]
    low, high = (limit / unit for limit in _limits(spec))

    def contrast(x):
        return np.clip(x * rng.uniform(*cfg["contrast"]), low, high) if rng.random() < p else x

    if rng.random() < p:
        x = np.clip(x + rng.uniform(-cfg["brightness"], cfg["brightness"]), low, high)
    contrast_first = rng.random() < 0.5
    if contrast_first:
        x = contrast(x)
    if x.shape[0] == 3:
        saturate, shift = rng.random() < p, rng.random() < p
        if saturate or shift:
            hsv = rgb2hsv(np.moveaxis(x / 255.0, 0, -1))
            if saturate:
                hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*cfg["saturation"]), 0, 1)
            if shift:  # OpenCV's hue has 180 steps per turn; mmseg's randint(-hue, hue) leaves out +hue
                steps = int(cfg["hue"])
                hsv[..., 0] = (hsv[..., 0] + (rng.integers(-steps, steps) if steps else 0) / 180.0) % 1
            x = np.moveaxis(hsv2rgb(hsv), -1, 0) * 255.0
    if not contrast_first:
        x = contrast(x)
    return x * unit


def _tinycd_changes(image: np.ndarray, cfg: dict, scale: float, rng) -> np.ndarray:
    """Step 6 on one date (``scale``: the raw value of 1.0)."""
    change, blur = cfg["brightness_contrast"], cfg["blur"]
    if change["prob"] and rng.random() < change["prob"]:
        alpha = 1 + rng.uniform(-change["contrast"], change["contrast"])
        image = image * alpha + rng.uniform(-change["brightness"], change["brightness"]) * scale
    if blur["prob"] and rng.random() < blur["prob"]:
        kernel = BLUR_KERNELS[blur["kernels"][int(rng.integers(len(blur["kernels"])))]]
        for axis in (-2, -1):
            image = convolve1d(image, kernel, axis=axis, mode="mirror")
    return image
