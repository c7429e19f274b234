"""Errors the engine reports to users; each message names the problem and the file."""


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
