"""Evaluate a package on a folder dataset ``A/ B/ label/`` (same file names; labels 0/1 or 0/255,
optionally with a value that marks unlabelled pixels, and their own nodata value, which does too)."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from geochange.engine.bands import check_band_counts
from geochange.engine.errors import GeoChangeError, RasterError
from geochange.engine.metrics import ConfusionMeter
from geochange.engine.options import EVALUATE, DetectOptions
from geochange.engine.package import ModelPackage
from geochange.engine.predictor import Predictor, model_tta
from geochange.engine.progress import Progress
from geochange.engine.rasters import open_raster, read_image, zeroed_where_invalid
from geochange.engine.stream import predict_plan
from geochange.engine.windows import WindowPlan, check_tiling


# Files beside an image that describe it: GDAL's statistics, overviews and mask, world files, a QGIS style.
SIDE_FILES = (".aux.xml", ".ovr", ".msk", ".wld", ".tfw", ".pgw", ".jgw", ".tifw", ".pngw", ".qml")


def dataset_pairs(root: str | os.PathLike) -> list[tuple[Path, Path, Path]]:
    """(A, B, label) paths of a folder dataset, sorted by name; missing counterparts are an error."""
    root = Path(root)
    folders = [root / name for name in ("A", "B", "label")]
    for folder in folders:
        if not folder.is_dir():
            raise GeoChangeError(f"{root}: a folder dataset needs A/, B/ and label/; {folder.name}/ is missing")
    # Hidden files (.DS_Store, editors' temporaries) are not images, nor the files that describe one.
    names = sorted(p.name for p in folders[0].iterdir()
                   if p.is_file() and not p.name.startswith(".") and not p.name.lower().endswith(SIDE_FILES))
    if not names:
        raise GeoChangeError(f"{folders[0]}: no images")
    lacking = [f"{f.name}/{n}" for n in names for f in folders[1:] if not (f / n).is_file()]
    if lacking:
        raise GeoChangeError(f"{root}: images without a counterpart: {', '.join(lacking[:10])}")
    return [tuple(f / n for f in folders) for n in names]


def label_band(image: np.ndarray, where) -> np.ndarray:
    """The band ``(H, W)`` of a ``(bands, H, W)`` label image. A label saved in colour is read by its first band
    where its colour bands agree (grey, an alpha band aside); where they differ (change drawn in green), that band
    alone would miss it: refused."""
    colours = image[1:3] if len(image) >= 3 else ()  # two bands: grey and alpha
    if not all(np.array_equal(band, image[0], equal_nan=True) for band in colours):
        raise RasterError(f"{where}: a label of {len(image)} bands whose colours differ; a label is one band, 0 (no "
                          "change) and 1 or 255 (change): save it as such")
    return image[0]


def label_nodata(src) -> float | None:
    """The nodata value of an open label file as the value of its unlabelled pixels, None where it is none: a PNG's
    is its transparency, a display setting (GDAL reads the tRNS chunk as nodata), and a nodata of 0 is no change
    in every label (one written with its image's profile declares it), never an unlabelled pixel."""
    return None if src.driver == "PNG" or src.nodata == 0 else src.nodata


def read_label(path: Path) -> tuple[np.ndarray, float | None]:
    """A dataset's label image, one band ``(H, W)`` (``label_band``), and the value of its unlabelled pixels
    that the file declares (``label_nodata``)."""
    band = label_band(read_image(path), path)
    with open_raster(path, georeferenced=False) as src:
        return band, label_nodata(src)


def check_one_size(pre: np.ndarray, post: np.ndarray, label: np.ndarray, paths) -> None:
    """A dataset pair's images and label, read from ``paths`` (A, B, label), must have one size."""
    for path, shape in ((paths[1], post.shape[1:]), (paths[2], label.shape)):
        if shape != pre.shape[1:]:
            raise RasterError(f"{path} is {shape[1]}x{shape[0]} px but {paths[0]} is "
                              f"{pre.shape[2]}x{pre.shape[1]} px; a pair and its label must have one size")


def change_label(raw: np.ndarray, where, ignore_value: float | None = None,
                 ignore_option: str = "--ignore-value", nodata: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(change, labelled)`` boolean masks of a label band: 0 = no change, 1 (a 0/1 label) or 255 (a
    0/255 label) = change, ``ignore_value`` and the label file's own ``nodata`` (``label_nodata``) = not labelled.

    Any other value, or 1 and 255 together, is refused: counting every non-zero value as change would
    silently turn the unlabelled pixels of a sparse label (255 beside 0/1) or other classes into change.
    (A nodata that hides the change value is the dataset's question, ``check_change_value``.)
    ``ignore_option`` is how the caller's user gives ``ignore_value``, for the hint.
    """
    labelled = np.ones(raw.shape, bool)
    for unlabelled in (ignore_value, nodata):
        if unlabelled is not None:  # NaN equals nothing, itself included
            labelled &= ~np.isnan(raw) if np.isnan(unlabelled) else raw != unlabelled
    values = set(np.unique(raw[labelled]).tolist())
    if values <= {0, 1} or values <= {0, 255}:
        return labelled & (raw != 0), labelled
    found = ", ".join(f"{v:g}" for v in sorted(values))
    left_out = [] if ignore_value is None else [f"the ignored {ignore_value:g}"]
    if nodata is not None:
        left_out.append(f"its nodata {nodata:g}")
    ignoring = f" (besides {' and '.join(left_out)})" if left_out else ""
    extra = sorted(values - {0, 1})
    hint = (f"; if {extra[0]:g} marks unlabelled pixels, give {ignore_option} {extra[0]:g}" if len(extra) == 1
            else "")
    raise RasterError(f"{where}: label values {found}{ignoring}; a label must be 0 (no change) and 1 or 255 "
                      f"(change){hint}")


def check_change_value(labels: list[Path], ignore_value: float | None = None,
                       ignore_option: str = "--ignore-value") -> None:
    """A dataset's labels must mark change with one value. Read one by one, a sparse 0/1 label whose 255 marks
    unlabelled pixels passes as 0/255 in every image without a 1, its unlabelled pixels counted as change: 1 in one
    label and 255 in another is refused, before anything is predicted (as are values no label may hold).

    A label's nodata of 1 or 255 marks unlabelled pixels where the dataset marks change with the other value. Where
    it is the dataset's change value, or no other pixel marks change, it would hide the change class (a 0/255 label
    saved with nodata 255): refused, unless ``ignore_value`` says that this value marks unlabelled pixels."""
    first, hidden = {}, {}  # change value -> the first label marking change with it, or hiding it as nodata
    for path in labels:
        raw, nodata = read_label(path)
        change, _ = change_label(raw, path, ignore_value, ignore_option, nodata)
        for value in (1, 255):
            if value not in first and (raw[change] == value).any():
                first[value] = path
            if value == nodata != ignore_value and value not in hidden and (raw == value).any():
                hidden[value] = path
    if len(first) == 2:
        hint = f"; if 255 marks unlabelled pixels, give {ignore_option} 255" if ignore_value is None else ""
        raise RasterError(f"{first[1]} marks change with 1 and {first[255]} with 255: a dataset's labels mark it "
                          f"with one value{hint}")
    for value, path in hidden.items():
        if value in first or not first:
            why = (f"the value {first[value]} marks change with" if first
                   else "and no other pixel of the dataset's labels marks change")
            raise RasterError(f"{path}: its nodata value is {value}, {why}: if {value} marks change, its change "
                              "would count in no metric; then clear the nodata (gdal_edit.py -unsetnodata). If "
                              f"{value} marks unlabelled pixels, give {ignore_option} {value}")


def predict_image(predictor, pre: np.ndarray, post: np.ndarray, tiling: DetectOptions | None = None) -> np.ndarray:
    """``(H, W)`` change probability of one ``(bands, H, W)`` pair: whole when it fits in ``tiling``'s tile
    (always without ``tiling``), as the papers test and the trainer tests; else window by window (the
    tile, overlap and batch of ``tiling``), blended."""
    if tiling is None or max(pre.shape[1:]) <= tiling.tile:
        return predictor(pre[None], post[None])[0]
    everywhere = np.ones(pre.shape[1:], bool)
    return predict_plan(predictor, WindowPlan(pre.shape[1], pre.shape[2], tiling.tile, tiling.overlap),
                        lambda w: (pre[(slice(None), *w.toslices())], post[(slice(None), *w.toslices())],
                                   everywhere[w.toslices()]), batch=tiling.batch, readers=0)


def evaluate_folder(package: ModelPackage, root: str | os.PathLike, *, ignore_value: float | None = None,
                    progress: Progress | None = None, **options) -> dict:
    """Metrics (global and per image) of the package's predictions on every pair of the dataset, with
    the names of the images evaluated.

    ``options``: the evaluate fields of ``engine.options.DetectOptions`` (tile, overlap, batch, device,
    threshold, tta, precision, sar_db). Images up to the tile (default: the package's) are predicted whole, as the
    papers and the trainer test; larger ones tile by tile. ``tta``: the test-time augmentation the package
    was tested with (else the default, see ``predictor.model_tta``). Label pixels equal to
    ``ignore_value`` or to their file's nodata value count in no metric.
    """
    progress = progress or Progress()
    options = DetectOptions.of(options, EVALUATE)
    threshold = package.threshold if options.threshold is None else options.threshold
    options = replace(options, tile=package.tile if options.tile is None else options.tile)
    check_tiling(options.tile, options.overlap)  # before any image: most fit in a tile and never make a plan
    pairs = dataset_pairs(root)
    check_change_value([label for _, _, label in pairs], ignore_value)  # before the model's export, if any
    predictor = Predictor(package, options.device, precision=options.precision, backend=options.backend,
                          tta=model_tta(package.manifest) if options.tta else None, sar_db=options.sar_db,
                          log=progress.log)
    meter = ConfusionMeter()
    for i, (path_a, path_b, path_label) in enumerate(pairs):
        progress.check()
        pre, post = read_image(path_a), read_image(path_b)
        label, nodata = read_label(path_label)
        check_one_size(pre, post, label, (path_a, path_b, path_label))
        change, labelled = change_label(label, path_label, ignore_value, nodata=nodata)
        valid = np.isfinite(pre).all(0) & np.isfinite(post).all(0)  # NaN, a float tile's nodata: in no metric
        pre, post = zeroed_where_invalid(pre, post, valid)
        check_band_counts(pre, post, package.manifest["inputs"], f"{path_a.parent.parent}/{{A,B}}/{path_a.name}",
                          "the dataset does not suit this model")
        prob = predict_image(predictor, pre, post, options)
        meter.add(prob > threshold, change, labelled & valid)
        progress.update(i + 1, len(pairs))
    return {**meter.summary(), "tile": options.tile, "tta": predictor.tta, "files": [a.name for a, _, _ in pairs]}
