"""What an analyst gets without deep learning, scored by the same metric code as the models: everything
"no change", and Otsu's threshold on the post-event SAR image (open water scatters the radar away from
the sensor and is dark, so the pixels at or below each image's Otsu threshold are called flooded)."""
from __future__ import annotations

import numpy as np
from skimage.filters import threshold_otsu


def no_change(pre: np.ndarray, post: np.ndarray) -> np.ndarray:
    return np.zeros(post.shape[-2:], np.float32)


def otsu_dark_water(pre: np.ndarray, post: np.ndarray) -> np.ndarray:
    """1 where the post SAR band is at or below its own Otsu threshold (water), else 0."""
    band = post[0].astype(np.float32)
    return (band <= threshold_otsu(band)).astype(np.float32)


BASELINES = {"all no change": no_change, "Otsu on the post SAR image": otsu_dark_water}
