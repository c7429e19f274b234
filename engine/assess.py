"""Accuracy of a change map against the analyst's reference, compared on one grid.

The prediction is a change mask (``geochange detect``'s: 255 change, 0 no change, 127 nodata; a 0/1 mask
too) or change polygons; the reference is a label raster (0 and 1 or 255, as ``evaluate.change_label``
reads it) or polygons (inside = change). The grid is the prediction mask's, or, for predicted polygons,
the reference raster's. Polygons are burnt in at pixel centres; a raster on another grid or CRS is warped
onto it with nearest resampling. Pixels outside the area of interest or either map's data, and reference
pixels equal to the ignore value, count in no figure.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from rasterio.enums import Resampling
from rasterio.windows import Window
from scipy import ndimage

from geochange.engine.aoi import area_of_interest, split_layer
from geochange.engine.atomic import atomic_path, check_outputs
from geochange.engine.contracts import (ASSESS_FN, ASSESS_FP, ASSESS_NOT_ASSESSED, ASSESS_TN, ASSESS_TP, MASK_NODATA,
                                        OBJECT_IOU)
from geochange.engine.errors import OptionError, RasterError
from geochange.engine.evaluate import change_label, label_band
from geochange.engine.grid import Grid, placement, warped_on
from geochange.engine.hardware import physical_memory
from geochange.engine.metrics import confusion, kappa, scores
from geochange.engine.progress import Progress
from geochange.engine.rasters import open_raster, read_masks
from geochange.engine.remote import refuse_remote


def is_raster(source: str) -> bool:
    """Whether GDAL opens ``source`` (a file, or ``FILE|layername=NAME``) as a raster; else it is polygons."""
    from osgeo import gdal

    path, layer = split_layer(source)
    if layer is not None:
        return False
    if not Path(path).is_file():
        raise RasterError(f"{path}: no such file")
    refuse_remote(path)
    gdal.PushErrorHandler("CPLQuietErrorHandler")  # "not recognised as a raster" is the answer, not an error
    try:
        return gdal.OpenEx(path, gdal.OF_RASTER) is not None
    except RuntimeError:  # GDAL's exceptions, where another library turned them on
        return False
    finally:
        gdal.PopErrorHandler()


def raster_on(path: str, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """The label band of ``path`` (``evaluate.label_band``) on ``grid`` (warped, nearest, where it is on another)
    and where it has data."""
    with open_raster(path) as src:
        if (src.crs is None) != (grid.crs is None):  # else "no pixel to assess", as if they lay apart
            raise RasterError(f"{path}: the map has {'no CRS' if src.crs is None else 'a CRS'} while the map it is "
                              f"compared with has {'one' if src.crs is None else 'none'}; it cannot be placed on it")
        if src.nodata == 0:
            raise RasterError(f"{path}: its nodata value is 0, which a change map uses for no change: every "
                              "no-change pixel would count in no figure. Clear it (gdal_edit.py -unsetnodata) or "
                              "set another (gdal_edit.py -a_nodata 127) first")
        if grid.matches(src):
            return label_band(src.read(), path), read_masks(src, 1) > 0
        # The mask marks the grid's pixels that the raster's footprint (and its data) covers.
        with warped_on(src, grid, Resampling.nearest) as vrt:
            return label_band(vrt.read(list(range(1, src.count + 1))), path), read_masks(vrt, 1) > 0


# What assess holds a pixel at most, in bytes: each map's values (up to 8) and masks, the pixels assessed, the
# objects' labels (two int32), the TP/FP/FN raster.
BYTES_PER_PIXEL = 32


def check_memory(grid: Grid, source: str) -> None:
    """Assess holds both maps on the grid whole (the objects are counted over all of it): one beyond the machine's
    memory is refused before it is read, not a MemoryError."""
    memory, gib = physical_memory(), 2**30
    need = grid.width * grid.height * BYTES_PER_PIXEL
    if memory is not None and need > memory:
        raise RasterError(f"{source}: {grid.width}x{grid.height} px, which assess holds whole: about {need / gib:.0f} "
                          f"GiB, more than this machine's {memory / gib:.0f} GiB; assess a part of both maps (cut "
                          "them first, e.g. gdal_translate -projwin)")


def grid_of(path: str) -> Grid:
    with open_raster(path) as src:
        return Grid(src.crs, placement(src), src.width, src.height)


def polygons_on(source: str, grid: Grid, role: str, allow_empty: bool = False) -> np.ndarray:
    """The grid's pixels whose centres lie inside the polygons of ``source``; ``allow_empty``: a layer without
    features covers none (detect's polygons where it found no change, a reference where nothing changed)."""
    polygons = area_of_interest(source, grid, role, allow_empty=allow_empty)
    return polygons.mask(Window(0, 0, grid.width, grid.height), grid)


def change_on(source: str, grid: Grid, role: str, ignore_value: float | None,
              reference: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(change, assessable)`` of a raster or polygon map on the grid; a ``reference`` raster's nodata checked
    (``check_reference_nodata``)."""
    if not is_raster(source):
        change = polygons_on(source, grid, role, allow_empty=True)
        return change, np.ones_like(change)
    raw, covered = raster_on(source, grid)
    if reference:
        check_reference_nodata(source, raw, covered, ignore_value)
    raw[~covered] = 0  # a nodata value outside the data is no label value
    change, labelled = change_label(raw, f"{source} ({role})", ignore_value)
    return change, labelled & covered


def check_reference_nodata(source: str, raw: np.ndarray, covered: np.ndarray, ignore_value: float | None) -> None:
    """Refuse a reference whose nodata value is 1 or 255 where none of its data on the grid marks change with the
    other: a 0/255 reference saved with nodata 255 has its change read as nodata, in no figure, unseen (a 0/1 one
    whose 255 marks unlabelled pixels shows its 1s; ``evaluate.check_change_value`` asks a dataset the same)."""
    with open_raster(source) as src:
        nodata = src.nodata  # as GDAL masks it: a PNG's transparency too
    if nodata not in (1, 255) or nodata == ignore_value:
        return
    other = 1 if nodata == 255 else 255
    if (raw[~covered] == nodata).any() and not (raw[covered] == other).any():
        raise RasterError(f"{source}: its nodata value is {nodata:g}, and none of its data marks change with {other}: "
                          f"if {nodata:g} marks change, its change reads as nodata and counts in no figure; then clear "
                          f"the nodata (gdal_edit.py -unsetnodata; for a PNG, gdal_translate -a_nodata none to a "
                          f"GeoTIFF). If {nodata:g} marks unlabelled pixels, give --ignore-value {nodata:g}")


def object_counts(truth: np.ndarray, predicted: np.ndarray, iou: float) -> dict:
    """Objects (4-connected regions, as ``engine.vectorize`` makes polygons) of both maps and how many match
    one of the other map at ``iou`` or more."""
    reference, n_reference = ndimage.label(truth)
    prediction, n_prediction = ndimage.label(predicted)
    both = (reference > 0) & (prediction > 0)
    # Only overlapping pairs can reach an IoU above 0: one code a pair, counted once (no loop over all pairs).
    pairs, overlap = np.unique(reference[both].astype(np.int64) * (n_prediction + 1) + prediction[both],
                               return_counts=True)
    ref_ids, pred_ids = pairs // (n_prediction + 1), pairs % (n_prediction + 1)
    union = np.bincount(reference.ravel())[ref_ids] + np.bincount(prediction.ravel())[pred_ids] - overlap
    matched = overlap / union >= iou
    found, true = len(np.unique(ref_ids[matched])), len(np.unique(pred_ids[matched]))
    return {"iou_threshold": iou, "reference": n_reference, "found": found, "missed": n_reference - found,
            "predicted": n_prediction, "true": true, "false": n_prediction - true}


def write_agreement(path, grid: Grid, truth: np.ndarray, predicted: np.ndarray, assessed: np.ndarray) -> None:
    """The TP/FP/FN raster (``contracts.ASSESS_*``), written atomically as a tiled, compressed GeoTIFF."""
    import rasterio

    agreement = np.full(truth.shape, ASSESS_TN, np.uint8)
    agreement[truth & predicted] = ASSESS_TP
    agreement[~truth & predicted] = ASSESS_FP
    agreement[truth & ~predicted] = ASSESS_FN
    agreement[~assessed] = ASSESS_NOT_ASSESSED
    profile = {"driver": "GTiff", "dtype": "uint8", "count": 1, "width": grid.width, "height": grid.height,
               "crs": grid.crs, "transform": grid.transform, "nodata": ASSESS_NOT_ASSESSED, "tiled": True,
               "compress": "deflate"}
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(agreement, 1)


STEPS = 4  # of progress: the prediction read, the reference read, the figures, the raster written


def assess(prediction: str, reference: str, *, aoi: str | None = None, ignore_value: float | None = None,
           object_iou: float = OBJECT_IOU, out_raster: str | None = None, progress: Progress | None = None) -> dict:
    """Pixel figures (confusion, change-class scores, kappa) and object counts of ``prediction`` against
    ``reference``; the TP/FP/FN raster written to ``out_raster`` if given. ``progress``: its steps (reading each
    map, the objects, the raster)."""
    progress = progress or Progress()
    if not 0 < object_iou <= 1:
        raise OptionError(f"--object-iou must be in (0, 1], not {object_iou:g}")
    check_outputs((out_raster,), (prediction, reference, aoi))
    on = next((source for source in (prediction, reference) if is_raster(source)), None)
    if on is None:
        raise RasterError(f"{prediction} and {reference}: both are polygons; give the prediction or the reference "
                          "as a raster (e.g. the change mask of geochange detect), whose grid the comparison uses")
    grid = grid_of(on)
    check_memory(grid, on)
    if on == prediction:
        # The mask's nodata is 127 (contracts.MASK_NODATA), read as a label's unlabelled value.
        predicted, valid = change_on(prediction, grid, "the prediction", MASK_NODATA)
    else:
        predicted, valid = change_on(prediction, grid, "the prediction", None)
    progress.update(1, STEPS)
    truth, labelled = change_on(reference, grid, "the reference", ignore_value, reference=True)
    progress.update(2, STEPS)
    assessed = valid & labelled
    if aoi:
        assessed &= polygons_on(aoi, grid, "the area of interest")
    if not assessed.any():
        raise RasterError(f"{prediction} and {reference}: no pixel to assess (the maps, their data and the area "
                          "of interest do not overlap)")
    cm = confusion(predicted, truth, assessed)
    (tn, fp), (fn, tp) = cm.tolist()
    objects = object_counts(truth & assessed, predicted & assessed, object_iou)
    progress.update(3, STEPS)
    if out_raster:
        write_agreement(out_raster, grid, truth, predicted, assessed)
    progress.update(STEPS, STEPS)
    return {"confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
            "global": {**{k: float(v) for k, v in scores(cm).items()}, "kappa": kappa(cm)},
            "objects": objects, "pixels_assessed": int(assessed.sum()),
            "grid": {"crs": str(grid.crs), "width": grid.width, "height": grid.height},
            "out_raster": str(out_raster) if out_raster else None}


# The figures shown by the command line, in order.
SHOWN = ("precision", "recall", "f1", "iou", "kappa", "oa")


def format_assessment(summary: dict) -> str:
    c, o = summary["confusion"], summary["objects"]
    lines = [f"pixels assessed: {summary['pixels_assessed']}   TN {c['tn']}  FP {c['fp']}  FN {c['fn']}  TP {c['tp']}"]
    lines += [f"{name:<12}{summary['global'][name]:>10.4f}" for name in SHOWN]
    lines.append(f"objects (IoU >= {o['iou_threshold']:g}): reference {o['reference']} (found {o['found']}, missed "
                 f"{o['missed']}), predicted {o['predicted']} (true {o['true']}, false {o['false']})")
    return "\n".join(lines)
