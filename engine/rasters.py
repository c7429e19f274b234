"""Raster input: opening, checking and reading pairs of georeferenced rasters with rasterio."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

from geochange.engine.errors import RasterError
from geochange.engine.remote import refuse_remote


def open_raster(path: str | os.PathLike, *, georeferenced: bool = True):
    """Open a raster for reading; a missing or unreadable file raises ``RasterError`` naming it, and so
    does, if ``georeferenced``, one located by ground control points only, which the engine cannot place."""
    path = Path(path)
    if not path.exists():
        if ":" in path.name or path.as_posix().startswith("/vsi"):  # GPKG:file:table, /vsizip/...: GDAL's names
            raise RasterError(f"{path}: no such file; GeoChange reads whole raster files: save this one as a "
                              f"GeoTIFF first, e.g. `gdal_translate '{path}' raster.tif`")
        raise RasterError(f"{path}: no such file")
    refuse_remote(path)
    try:
        with warnings.catch_warnings():  # a raster without a CRS is paired pixel for pixel, and says so
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            src = rasterio.open(path)
    except RasterioIOError as e:
        raise RasterError(f"{path}: not a readable raster ({e})") from None
    subdatasets = src.subdatasets if src.count == 0 else []
    if subdatasets:
        src.close()
        raise RasterError(f"{path}: holds {len(subdatasets)} rasters, not one; save the one to use as a GeoTIFF "
                          f"first, e.g. `gdal_translate '{subdatasets[0]}' raster.tif`")
    complex_types = sorted({dtype for dtype in src.dtypes if dtype.startswith("complex")})
    if complex_types:  # torch would keep the real part, silently
        src.close()
        raise RasterError(f"{path}: complex pixels ({', '.join(complex_types)}), as in single-look complex SAR; give "
                          f"their amplitude or intensity instead")
    gcps, gcp_crs = src.gcps
    if georeferenced and src.crs is None and gcps:
        src.close()
        raise RasterError(f"{path}: georeferenced by {len(gcps)} ground control points only, without a "
                          f"geotransform; warp it onto a CRS first, e.g. `gdalwarp -t_srs "
                          f"{gcp_crs.to_string() if gcp_crs else 'EPSG:4326'} {path.name} warped.tif`")
    return src


def check_two_dates(pre_path, post_path) -> None:
    """The pre and the post raster must be two files: one file given twice (a slip of the file dialog, or
    the same layer picked twice) would only report no change, after the whole run."""
    if os.path.samefile(pre_path, post_path):
        raise RasterError(f"{pre_path}: the pre and the post raster are the same file; a change map needs "
                          "two dates")


def corrupt_pixels(path, error: Exception) -> RasterError:
    """The error for pixels that cannot be read, as in a file damaged or cut short after its header."""
    return RasterError(f"{path}: cannot read pixels, the file is corrupt ({error})")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """A whole (small, possibly non-georeferenced) image as ``(bands, H, W)``, e.g. a dataset PNG."""
    with open_raster(path, georeferenced=False) as src:
        try:
            return src.read()
        except RasterioIOError as e:
            raise corrupt_pixels(path, e) from None


def has_mask(src) -> bool:
    """Whether GDAL masks any pixel of ``src`` (a nodata value, an alpha or a mask band)."""
    from rasterio.enums import MaskFlags

    return any(MaskFlags.all_valid not in flags for flags in src.mask_flag_enums) or _typed_alpha(src) is not None


def _typed_alpha(dataset) -> int | None:
    """The alpha band of ``dataset`` where it is of another type than byte or uint16, of which GDAL makes no mask."""
    alpha = [i for i, colour in enumerate(dataset.colorinterp, 1) if colour == ColorInterp.alpha]
    return alpha[0] if alpha and dataset.dtypes[alpha[0] - 1] not in ("uint8", "uint16") else None


def read_masks(dataset, bands, window=None) -> np.ndarray:
    """GDAL's masks of ``bands`` of a dataset or a ``GridReader`` (0: masked), or, where it has an alpha band of
    another type than byte or uint16, that band: GDAL derives masks from those two types only and takes every pixel
    as valid for the others, and a ``WarpedVRT`` of a float or int16 raster gives its added alpha band the raster's
    type (outside the raster and under its mask band, pixels were read as valid zeros)."""
    alpha = _typed_alpha(dataset)
    if alpha is not None:
        valid = dataset.read(alpha, window=window) > 0
        return valid if isinstance(bands, int) else valid[None]  # as GDAL's: one band's, or a stack
    return dataset.read_masks(bands, window=window)


def valid_mask(reader, window, data: np.ndarray, bands: list[int], masked: bool) -> np.ndarray:
    """Pixels valid in every used band: GDAL's mask (nodata value, alpha, mask band; read only where ``masked``,
    ``has_mask``) and not NaN. ``reader``: a ``GridReader`` or a dataset."""
    if masked:
        valid = read_masks(reader, bands, window=window).all(axis=0)
    else:  # no nodata, alpha or mask band: GDAL's all-valid mask and its test cost a third of a read
        valid = np.ones(data.shape[1:], bool)
    if np.issubdtype(data.dtype, np.floating):
        valid &= np.isfinite(data).all(axis=0)
    return valid


def zeroed_where_invalid(pre: np.ndarray, post: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``pre`` and ``post`` with the pixels that are not ``valid`` (nodata, NaN) zeroed: no NaN reaches the model."""
    if valid.all():
        return pre, post
    return tuple(np.where(valid, image, 0).astype(image.dtype) for image in (pre, post))
