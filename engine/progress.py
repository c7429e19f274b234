"""One progress/cancel interface for every front end (tqdm in the CLI, feedback in QGIS)."""
from __future__ import annotations

from geochange.engine.errors import Cancelled


class Progress:
    """Silent progress; front ends override ``update``/``log``/``cancelled``.

    The engine calls ``update`` after every batch and ``check`` before every batch, so a cancel
    takes effect within one batch.
    """

    def update(self, done: int, total: int) -> None:
        """``done`` of ``total`` work units (windows) are finished."""

    def log(self, message: str) -> None:
        """A line for the user (warnings, summary)."""

    def cancelled(self) -> bool:
        return False

    def check(self) -> None:
        if self.cancelled():
            raise Cancelled()


class TqdmProgress(Progress):
    """Progress bar on stderr for the CLI."""

    def __init__(self, description: str = "detect"):
        self._description = description
        self._bar = None

    def update(self, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self._description, unit="win")
        self._bar.n = done
        self._bar.refresh()
        if done >= total:
            self._bar.close()

    def log(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message)
