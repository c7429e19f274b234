"""Evaluate a package on a folder dataset ``A/ B/ label/`` (same file names; labels 0/1 or 0/255)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from geochange.engine.errors import GeoChangeError
from geochange.engine.inference import predict_plan
from geochange.engine.metrics import ConfusionMeter
from geochange.engine.package import ModelPackage
from geochange.engine.predict import Predictor
from geochange.engine.progress import Progress
from geochange.engine.rasters import check_band_counts, read_image
from geochange.engine.windows import WindowPlan


def dataset_pairs(root: str | os.PathLike) -> list[tuple[Path, Path, Path]]:
    """(A, B, label) paths of a folder dataset, sorted by name; missing counterparts are an error."""
    root = Path(root)
    folders = [root / name for name in ("A", "B", "label")]
    for folder in folders:
        if not folder.is_dir():
            raise GeoChangeError(f"{root}: a folder dataset needs A/, B/ and label/; {folder.name}/ is missing")
    names = sorted(p.name for p in folders[0].iterdir() if p.is_file())
    if not names:
        raise GeoChangeError(f"{folders[0]}: no images")
    lacking = [f"{f.name}/{n}" for n in names for f in folders[1:] if not (f / n).is_file()]
    if lacking:
        raise GeoChangeError(f"{root}: images without a counterpart: {', '.join(lacking[:10])}")
    return [tuple(f / n for f in folders) for n in names]


def evaluate_folder(package: ModelPackage, root: str | os.PathLike, *, device: str = "auto",
                    tile: int = 512, overlap: int = 64, batch: int = 4, threshold: float | None = None,
                    progress: Progress | None = None) -> dict:
    """Metrics (global and per image) of the package's predictions on every pair of the dataset.

    Images up to ``tile`` px are predicted whole, as the papers test; larger ones tile by tile.
    """
    progress = progress or Progress()
    threshold = package.threshold if threshold is None else threshold
    predictor = Predictor(package, device)
    meter = ConfusionMeter()
    pairs = dataset_pairs(root)
    for i, (path_a, path_b, path_label) in enumerate(pairs):
        progress.check()
        pre, post, label = read_image(path_a), read_image(path_b), read_image(path_label)[0]
        check_band_counts(pre, post, package.manifest["inputs"], f"{path_a.parent.parent}/{{A,B}}/{path_a.name}",
                          "the dataset does not suit this model")
        plan = WindowPlan(pre.shape[1], pre.shape[2], tile, overlap)
        everywhere = np.ones(pre.shape[1:], bool)
        prob = predict_plan(predictor, plan, lambda w: (pre[(slice(None), *w.toslices())],
                                                         post[(slice(None), *w.toslices())],
                                                         everywhere[w.toslices()]), batch=batch, readers=0)
        meter.add(prob > threshold, label > 0)
        progress.update(i + 1, len(pairs))
    return meter.summary()
