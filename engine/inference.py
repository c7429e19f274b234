"""Detection over a georeferenced raster pair: window plan, batched model runs, blending, outputs."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from geochange.engine.atomic import atomic_path
from geochange.engine.errors import RasterError
from geochange.engine.package import ModelPackage, load_package
from geochange.engine.predict import Predictor
from geochange.engine.progress import Progress
from geochange.engine.rasters import (MASK_NODATA, PROBABILITY_NODATA, check_same_grid, open_raster,
                                      select_bands, valid_mask, write_geotiff)
from geochange.engine.vectorize import change_polygons, write_polygons
from geochange.engine.windows import WindowPlan, blend_weights

# read(window) -> (pre raw, post raw, valid) arrays of one window.
WindowReader = Callable[[object], tuple]


def predict_plan(predictor: Predictor, plan: WindowPlan, read: WindowReader, *, batch: int = 4,
                 progress: Progress | None = None) -> np.ndarray:
    """Blended change probability over the plan's raster; NaN where no window had a valid pixel."""
    progress = progress or Progress()
    weighted = np.zeros((plan.height, plan.width), dtype=np.float32)
    weight = np.zeros((plan.height, plan.width), dtype=np.float32)
    windows = plan.windows()
    progress.update(0, len(windows))
    for start in range(0, len(windows), batch):
        progress.check()
        chunk = []
        for window in windows[start:start + batch]:
            pre, post, valid = read(window)
            if np.any(valid):  # windows with no valid pixel are not run
                chunk.append((window, pre, post))
        if chunk:
            probs = predictor(np.stack([c[1] for c in chunk]), np.stack([c[2] for c in chunk]))
            for (window, _, _), prob in zip(chunk, probs):
                rows, cols = window.toslices()
                w = blend_weights(window, plan)
                weighted[rows, cols] += prob * w
                weight[rows, cols] += w
        progress.update(min(start + batch, len(windows)), len(windows))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight > 0, weighted / weight, np.nan).astype(np.float32)


@dataclass
class DetectResult:
    probability: Path
    mask: Path
    polygons: Path
    polygon_count: int
    changed_area_m2: float


def detect(pre_path: str | os.PathLike, post_path: str | os.PathLike, model: str | os.PathLike | ModelPackage, *,
           probability: str | os.PathLike, mask: str | os.PathLike, polygons: str | os.PathLike,
           tile: int = 512, overlap: int = 64, batch: int = 4, device: str = "auto",
           threshold: float | None = None, min_area: float = 0.0, simplify: float = 0.0,
           pre_bands: list[int] | None = None, post_bands: list[int] | None = None,
           progress: Progress | None = None) -> DetectResult:
    """Change probability, mask and polygons for a pre/post pair on one grid.

    ``threshold`` defaults to the package's; ``min_area`` is in m2, ``simplify`` in map units;
    ``pre_bands``/``post_bands`` are 1-based band indexes in the order the model wants them.
    Every output is written under a temporary name and renamed only when all succeeded.
    """
    progress = progress or Progress()
    package = model if isinstance(model, ModelPackage) else load_package(model)
    threshold = package.threshold if threshold is None else float(threshold)
    predictor = Predictor(package, device)
    inputs = package.manifest["inputs"]
    with open_raster(pre_path) as pre, open_raster(post_path) as post:
        check_same_grid(pre, post)
        bands_a = select_bands(pre, inputs["pre"], "pre", pre_bands)
        bands_b = select_bands(post, inputs["post"], "post", post_bands)
        valid = np.zeros((pre.height, pre.width), dtype=bool)

        def read(window):
            a, b = pre.read(bands_a, window=window), post.read(bands_b, window=window)
            ok = valid_mask(pre, window, a, bands_a) & valid_mask(post, window, b, bands_b)
            valid[window.toslices()] = ok
            # Invalid pixels are zeroed so NaN cannot leak into the model through convolutions.
            return np.where(ok, a, 0), np.where(ok, b, 0), ok

        plan = WindowPlan(pre.height, pre.width, tile, overlap)
        progress.log(f"{len(plan)} windows of {min(tile, pre.height)}x{min(tile, pre.width)} px "
                     f"on {predictor.device}")
        prob = predict_plan(predictor, plan, read, batch=batch, progress=progress)
        if not valid.any():
            raise RasterError(f"no pixel is valid in both {Path(pre_path).name} and {Path(post_path).name} "
                              "(nodata everywhere)")
        valid &= np.isfinite(prob)
        changed = valid & (prob > threshold)  # strict, as argmax and the authors do
        progress.check()
        found = change_polygons(changed, prob, pre.transform, pre.crs, min_area_m2=min_area, simplify=simplify)
        with atomic_path(probability) as tmp_prob, atomic_path(mask) as tmp_mask, \
                atomic_path(polygons) as tmp_poly:
            write_geotiff(tmp_prob, np.where(valid, prob, PROBABILITY_NODATA).astype(np.float32), pre,
                          PROBABILITY_NODATA)
            write_geotiff(tmp_mask, np.where(valid, changed.astype(np.uint8) * 255, MASK_NODATA)
                          .astype(np.uint8), pre, MASK_NODATA)
            write_polygons(found, tmp_poly, pre.crs)
            progress.check()
    return DetectResult(Path(probability), Path(mask), Path(polygons), len(found),
                        float(sum(p.area_m2 for p in found)))
