"""The window plan: which tiles cover a raster, in which order."""
from __future__ import annotations

import math
from dataclasses import dataclass

from rasterio.windows import Window

from geochange.engine.errors import OptionError
from geochange.engine.options import MIN_TILE, flag


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile offsets along one axis: regular steps, the last tile flush with the far edge."""
    if size <= tile:
        return [0]
    count = math.ceil((size - tile) / stride) + 1
    return sorted({min(i * stride, size - tile) for i in range(count)})


def check_tiling(tile: int, overlap: int) -> None:
    if tile < MIN_TILE:
        raise OptionError(f"{flag('tile')} must be at least {MIN_TILE} px, not {tile}")
    if not 0 <= overlap < tile:
        raise OptionError(f"{flag('overlap')} must be in [0, tile) = [0, {tile}), not {overlap}")


@dataclass(frozen=True)
class WindowPlan:
    """Tiles of ``tile`` px overlapping by ``overlap`` px over a ``height`` x ``width`` raster.

    A raster smaller than a tile along an axis gets one window of its own size along it.
    Windows are ordered row by row (top to bottom, left to right).
    """

    height: int
    width: int
    tile: int = 512
    overlap: int = 64

    def __post_init__(self):
        check_tiling(self.tile, self.overlap)

    @property
    def rows(self) -> list[int]:
        return _starts(self.height, self.tile, self.tile - self.overlap)

    @property
    def cols(self) -> list[int]:
        return _starts(self.width, self.tile, self.tile - self.overlap)

    def row_windows(self, index: int) -> list[Window]:
        """The windows of tile row ``index``, left to right."""
        h, w = min(self.tile, self.height), min(self.tile, self.width)
        return [Window(c, self.rows[index], w, h) for c in self.cols]

    def windows(self) -> list[Window]:
        return [window for i in range(len(self.rows)) for window in self.row_windows(i)]

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)
