"""Errors the engine reports to users; each message names the problem and the file."""
from __future__ import annotations

import contextlib
import shutil
import sys
import traceback
from pathlib import Path


class GeoChangeError(Exception):
    """Base of every error a user should see as a plain message (CLI exit 2, QGIS exception)."""


class Cancelled(GeoChangeError):
    """The user cancelled a run; nothing was left under a final name."""

    def __init__(self, message: str = "cancelled by the user"):
        super().__init__(message)


class RasterError(GeoChangeError, ValueError):
    """An input raster cannot be used (missing, corrupt, wrong bands, no overlap, all nodata)."""


class OptionError(GeoChangeError, ValueError):
    """An option's value cannot be used (a tile size, an overlap)."""


class PackageError(GeoChangeError, ValueError):
    """A file is not a usable GeoChange package (model or router); the message says why."""


class CheckpointError(GeoChangeError, ValueError):
    """A foreign checkpoint cannot be read, or does not fit the model it is loaded into."""


class OutputError(GeoChangeError, OSError):
    """An output cannot be written (a folder that cannot be made or written in, a file in the way, a full disk)."""


# How a full disk shows in OS and GDAL messages: strerror (libtiff quotes it), SQLite (GeoPackage),
# GDAL's estimate before it creates a large uncompressed GeoTIFF.
_DISK_FULL = ("no space left", "disk is full", "free disk space available")
_NEARLY_FULL_BYTES = 2**20


def output_error(path, detail: str) -> OutputError:
    """``path`` could not be written (``detail``: an OS or GDAL message), as one line. A full disk is
    named as such even where ``detail`` does not say so: GeoJSON and shapefile writers give no reason."""
    path = Path(path)
    folder = next(p for p in path.parents if p.exists())
    said = detail.lower()
    if any(words in said for words in _DISK_FULL) or (  # a read-only file system also shows 0 bytes free
            "read-only" not in said and shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES):
        return OutputError(f"{path}: no space left on the device")
    lines = detail.strip().splitlines()  # the first line, cut short: SQLite quotes whole statements
    return OutputError(f"{path}: cannot be written: {lines[0][:300] if lines else 'no reason given'}")


def _gdal_destructor_error(unraisable) -> bool:
    """Whether Python is about to print an error raised in a GDAL dataset's destructor as ignored."""
    return isinstance(unraisable.exc_value, RuntimeError) and getattr(unraisable.object, "__name__", "").startswith(
        "delete_")


@contextlib.contextmanager
def gdal_write_errors(path):
    """A block of GDAL calls writing ``path``: a failure GDAL reports in it raises ``OutputError``
    once it ends, even where the call that failed returned no error (a flush in a destructor, a
    driver that goes on). GDAL keeps error handlers per thread: threads do not see each other's.
    Where GDAL's exceptions are on, a destructor (closing a file) also raises what the handler has
    recorded; Python can only print that as ignored, which it is not: not printed."""
    from osgeo import gdal

    failures = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None if _gdal_destructor_error(unraisable) else previous(unraisable)
    gdal.PushErrorHandler(lambda kind, number, message: failures.append(message) if kind >= gdal.CE_Failure else None)
    try:
        yield
    except RuntimeError as error:  # GDAL's exceptions, where another library in this process turned them on
        failures.append(str(error))
    finally:
        gdal.PopErrorHandler()
        sys.unraisablehook = previous
    if failures:
        raise output_error(path, failures[0])


@contextlib.contextmanager
def closed_on_failure(close):
    """A block opening a file with GDAL, which ``close`` closes: where the block fails, the file is closed before
    the error goes on. Left to Python, it would close when the error is dropped, with the frames of its traceback
    (and of the errors chained to it), which hold the file's objects: after the error's one line, GDAL would print
    what its flush on a full disk could not write, or Python an ignored exception where GDAL's exceptions are on.
    So those frames are cleared first (the caller's own, still running, holds none: it keeps them on ``self``)."""
    try:
        yield
    except BaseException as error:
        chained = error
        while chained is not None:
            traceback.clear_frames(chained.__traceback__)
            chained = chained.__cause__ or chained.__context__
        close()
        raise
