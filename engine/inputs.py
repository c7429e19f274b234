"""What a date's input looks like and how raw raster values become model input.

An input spec (stored per date in a package manifest) is a dict:
``bands`` (bands read from the raster), ``modality`` (optical or sar), ``dtype`` and ``scale`` (the
training data's type and the value that meant 1.0 in it, e.g. uint8 and 255), ``mean``/``std`` (per
model channel, applied to values in [0, 1]) and, for a grey SAR date that a model sees as several
channels, ``replicate`` (the channel count it is copied to). A SAR spec may carry ``db_range``: the
dB interval mapped onto [0, 1] when the input holds physical backscatter (float rasters).
"""
from __future__ import annotations

import numpy as np
import torch

from geochange.engine.errors import RasterError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The value meaning 1.0 for inputs whose type differs from the training data's: 8-bit images,
# reflectance x 10000 (Sentinel-2, Landsat surface reflectance), float reflectance.
DEFAULT_SCALES = {"uint8": 255.0, "uint16": 10000.0, "int16": 10000.0, "float32": 1.0, "float64": 1.0}
# Assumed dB window of SAR backscatter (VV) for models trained on 8-bit SAR images.
DEFAULT_DB_RANGE = (-25.0, 0.0)
# Past this share of values below -1, float SAR read as linear power is taken for dB (``check_backscatter``).
DB_SHARE = 0.5


def optical_input(bands: int = 3, scale: float = 255.0, dtype: str = "uint8") -> dict:
    """An optical date: ImageNet statistics for RGB, neutral ones for other band counts."""
    mean = list(IMAGENET_MEAN) if bands == 3 else [0.5] * bands
    std = list(IMAGENET_STD) if bands == 3 else [0.25] * bands
    return {"bands": bands, "modality": "optical", "dtype": dtype, "scale": scale, "mean": mean, "std": std}


def sar_input(channels: int = 3, scale: float = 255.0, dtype: str = "uint8") -> dict:
    """A SAR date given as one grey band replicated to ``channels`` (as M2CD does)."""
    spec = optical_input(channels, scale, dtype)
    spec.update(modality="sar", bands=1, replicate=channels, db_range=list(DEFAULT_DB_RANGE))
    return spec


def model_channels(spec: dict) -> int:
    return int(spec.get("replicate", spec["bands"]))


def input_scale(dtype: str, spec: dict, override: float | None = None) -> float:
    """The value meaning 1.0 in an input of ``dtype``: ``override``, else the training data's scale
    when the types agree, else the usual convention for that type."""
    if override is not None:
        return float(override)
    if dtype == spec.get("dtype", "uint8"):
        return float(spec["scale"])
    return DEFAULT_SCALES.get(dtype, 1.0)


def check_backscatter(raw: np.ndarray, spec: dict, sar_db: bool, what: str) -> None:
    """Refuse a float SAR date read as linear power that holds dB: read so, all of it would map to 0, a blank date.
    Power is never below 0 but for thermal-noise removal's small residues (about -0.001, read as the window's
    floor); dB backscatter is below -1 nearly everywhere. Most non-zero values (invalid pixels are zeroed before)
    below -1 say dB."""
    if sar_db or spec["modality"] != "sar" or raw.dtype.kind != "f":
        return
    values = raw[np.isfinite(raw) & (raw != 0)]
    below = np.count_nonzero(values < -1)
    if below > DB_SHARE * values.size:
        raise RasterError(f"{what} holds backscatter in dB, not linear power: {below / values.size:.0%} of its "
                          "values are below -1; say so (--sar-db for detect and evaluate, data.sar_db for the "
                          "trainer), or declare the raster's nodata value if those are nodata")


def backscatter_unit_interval(x: torch.Tensor, spec: dict, sar_db: bool) -> torch.Tensor:
    """SAR backscatter, dB (``sar_db``) or linear power, mapped from the spec's ``db_range`` onto [0, 1]."""
    db = x if sar_db else 10.0 * torch.log10(x.clamp_min(1e-6))
    low, high = spec.get("db_range", DEFAULT_DB_RANGE)
    return ((db - low) / (high - low)).clamp(0.0, 1.0)


def normalise(raw: np.ndarray | torch.Tensor, spec: dict, *, scale: float | None = None,
              sar_db: bool = False) -> torch.Tensor:
    """``(N, bands, H, W)`` raw values -> float32 model input ``(N, channels, H, W)``.

    Float SAR holds physical backscatter: dB (``sar_db``) or linear power, mapped from the spec's
    ``db_range`` onto [0, 1]. Everything else is divided by its scale (see ``input_scale``).
    """
    raw = torch.as_tensor(raw)
    dtype = str(raw.dtype).replace("torch.", "")
    x = raw.float()
    if spec["modality"] == "sar" and raw.is_floating_point() and scale is None:
        x = backscatter_unit_interval(x, spec, sar_db)
    else:
        x = x / input_scale(dtype, spec, scale)
    if "replicate" in spec:
        x = x.expand(-1, spec["replicate"], -1, -1)
    mean = torch.tensor(spec["mean"], dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std
