"""Run a package's model on batches of raw pixel windows and return change probabilities."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from geochange.engine.errors import GeoChangeError
from geochange.engine.inputs import normalise
from geochange.engine.package import ModelPackage

# Every registered backbone reduces by at most 32; inputs are padded to a multiple of it.
SIZE_MULTIPLE = 32


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:i``, checked against the machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GeoChangeError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GeoChangeError(f"device {name!r} asked for, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GeoChangeError(f"device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    elif device.type != "cpu":
        raise GeoChangeError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    if not (pad_h or pad_w):
        return x
    # Reflection keeps image statistics at the border; it needs the pad to be smaller than the side.
    mode = "reflect" if pad_h < h and pad_w < w else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def to_probability(output: torch.Tensor, activation: str) -> torch.Tensor:
    """Model output ``(N, C, H, W)`` -> change probability ``(N, H, W)``."""
    if activation == "sigmoid":
        return torch.sigmoid(output[:, 0])
    return torch.softmax(output, dim=1)[:, 1]


class Predictor:
    """Normalises raw windows as the package's manifest says and returns probabilities."""

    def __init__(self, package: ModelPackage, device: str | torch.device = "auto"):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.package = package
        self.model = package.model.to(self.device).eval()
        self.inputs = package.manifest["inputs"]

    @torch.inference_mode()
    def __call__(self, pre: np.ndarray, post: np.ndarray) -> np.ndarray:
        """``(N, bands, H, W)`` raw windows of each date -> ``(N, H, W)`` float32 probabilities."""
        h, w = pre.shape[-2:]
        x_pre = _pad_to_multiple(normalise(pre, self.inputs["pre"]).to(self.device), SIZE_MULTIPLE)
        x_post = _pad_to_multiple(normalise(post, self.inputs["post"]).to(self.device), SIZE_MULTIPLE)
        output = self.model(x_pre, x_post)
        prob = to_probability(output.float(), self.package.activation)[:, :h, :w]
        return prob.cpu().numpy()
