"""What the engine, its worker processes and the QGIS plugin agree on, each defined once: the values of
the output rasters, the worker module that serves each task, and the JSON lines of the worker protocol.

Standard library only: the plugin, which runs in QGIS's Python without torch or numpy, imports it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

# --- The output rasters -----------------------------------------------------------------------------

PROBABILITY_NODATA = -1.0  # float32, the change probability in 0..1 elsewhere
MASK_NO_CHANGE = 0  # uint8
MASK_CHANGE = 255
MASK_NODATA = 127
POLYGON_LAYER = "changes"  # the polygons' layer in their file, unless the caller names another
# The polygons' file formats, by their suffix: --vector-format, the files QGIS offers and hands the engine.
VECTOR_FORMATS = ("gpkg", "shp", "geojson")
# A detection's outputs in a folder: the command line's --out, each pair's folder of detect-many.
OUTPUT_NAMES = {"probability": "change_probability.tif", "mask": "change_mask.tif",
                "polygons": "change_polygons.gpkg"}


def output_names(vector_format: str = "gpkg") -> dict:
    """``OUTPUT_NAMES`` with the polygons in ``vector_format`` (gpkg, geojson or shp)."""
    return dict(OUTPUT_NAMES, polygons=f"change_polygons.{vector_format}")


# The accuracy assessment's raster (uint8), ``geochange assess``: each pixel's agreement with the reference.
ASSESS_TN, ASSESS_TP, ASSESS_FP, ASSESS_FN = 0, 1, 2, 3
ASSESS_NOT_ASSESSED = 255  # outside the area of interest, nodata, or the ignore value
# IoU at which two objects are the same: 0.5, as object detection counts (PASCAL VOC, COCO's AP50). Above
# it, an object matches at most one object of the other map, so found/missed and true/false stay one-to-one.
OBJECT_IOU = 0.5

# --- Worker processes ------------------------------------------------------------------------------

# ``python -m MODULE`` serves one job of the task. Training is a layer above the engine: its worker is
# the engine's with the train task added. (Named here for the plugin; the engine never imports it.)
ENGINE_WORKER = "geochange.engine.worker"
TRAINER_WORKER = "geochange.trainer.worker"
WORKERS = {"detect": ENGINE_WORKER, "vectorize": ENGINE_WORKER, "evaluate": ENGINE_WORKER, "info": ENGINE_WORKER,
           "assess": ENGINE_WORKER, "check": ENGINE_WORKER, "detect_many": ENGINE_WORKER, "train": TRAINER_WORKER}

# --- Detection over many pairs (``geochange detect-many``) ------------------------------------------
# Beside the pairs' folders in the output folder: one row a pair (its footprint in EPSG:4326 in the GeoPackage).
SUMMARY_FILES = ("summary.gpkg", "summary.csv")
SUMMARY_LAYER = "pairs"
# A pair's status: detected in this run, complete from an earlier run, failed (its error recorded), not yet run.
PAIR_DONE, PAIR_SKIPPED, PAIR_FAILED, PAIR_PENDING = "done", "skipped", "failed", "pending"

# --- The worker protocol ---------------------------------------------------------------------------
# stdin: one job, {"task": NAME, "args": {...}}. stdout: one JSON object a line, with one of the keys
#     progress   percent done
#     log        a line for the user
#     result     the task's answer (the last line; exit status 0)
#     error      the engine's message (the last line; exit status 2, or 1 for a bug), see ``EngineError``

PROGRESS, LOG, RESULT, ERROR = "progress", "log", "result", "error"
MISSING_DEPENDENCY = "MissingDependency"  # the kind of error that lists the packages to install


def job_text(task: str, args: dict) -> str:
    return json.dumps({"task": task, "args": args})


def read_job(text: str) -> tuple[str, dict]:
    job = json.loads(text)
    return job["task"], job.get("args", {})


def _line(message: dict) -> str:
    return json.dumps(message, default=str)  # a stray Path in a result is written as its text


def progress_line(done: int, total: int) -> str:
    return _line({PROGRESS: round(100.0 * done / total, 3)})


def log_line(text: str) -> str:
    return _line({LOG: text})


def result_line(result) -> str:
    return _line({RESULT: result})


@dataclass(frozen=True)
class EngineError:
    """A job's failure. ``kind``: the exception's class name, or ``MISSING_DEPENDENCY``, which names the
    ``missing`` modules ({module: {"pip": what to install, "reason": why}}) of the interpreter ``python``
    (Python ``version``, ``venv``: a virtual environment). ``traceback``: a bug's."""

    message: str
    kind: str
    cancelled: bool = False
    traceback: str | None = None
    missing: dict | None = None
    python: str | None = None
    version: str | None = None
    venv: bool = False

    def line(self) -> str:
        fields = {k: v for k, v in vars(self).items() if k != "message" and v is not None}
        return _line({ERROR: self.message, **fields})


def read_line(text: str) -> tuple[str, object] | None:
    """A worker's stdout line as (``PROGRESS``, percent), (``LOG``, text), (``RESULT``, answer) or
    (``ERROR``, ``EngineError``); None for a line that is not a message."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(message, dict):
        return None
    if ERROR in message:
        return ERROR, EngineError(message.pop(ERROR), **message)
    return next(((kind, message[kind]) for kind in (PROGRESS, LOG, RESULT) if kind in message), None)
