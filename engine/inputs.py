"""What a date's input looks like and how raw raster values become model input.

An input spec (stored per date in a package manifest) is a dict:
``bands`` (bands read from the raster), ``modality`` (optical or sar), ``scale`` (raw / scale gives
[0, 1]), ``mean``/``std`` (per model channel, applied after scaling) and, for a grey SAR date that
a model sees as several channels, ``replicate`` (the channel count it is copied to).
"""
from __future__ import annotations

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def optical_input(bands: int = 3, scale: float = 255.0) -> dict:
    """An optical date: ImageNet statistics for RGB, neutral ones for other band counts."""
    mean = list(IMAGENET_MEAN) if bands == 3 else [0.5] * bands
    std = list(IMAGENET_STD) if bands == 3 else [0.25] * bands
    return {"bands": bands, "modality": "optical", "scale": scale, "mean": mean, "std": std}


def sar_input(channels: int = 3, scale: float = 255.0) -> dict:
    """A SAR date given as one grey band replicated to ``channels`` (as M2CD does)."""
    spec = optical_input(channels, scale)
    spec.update(modality="sar", bands=1, replicate=channels)
    return spec


def model_channels(spec: dict) -> int:
    return int(spec.get("replicate", spec["bands"]))


def normalise(raw: np.ndarray | torch.Tensor, spec: dict) -> torch.Tensor:
    """``(N, bands, H, W)`` raw values -> float32 model input ``(N, channels, H, W)``."""
    x = torch.as_tensor(raw).float()
    if "replicate" in spec:
        x = x.expand(-1, spec["replicate"], -1, -1)
    mean = torch.tensor(spec["mean"], dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x / float(spec["scale"]) - mean) / std
