"""One progress/cancel interface for every front end (tqdm in the CLI, feedback in QGIS)."""
from __future__ import annotations

import signal

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


def cancel_on_sigterm() -> None:
    """Make SIGTERM (a job scheduler's or torchrun's stop, QGIS's cancel of a worker) a cancel: it
    raises ``Cancelled`` in the main thread, so the engine's ``finally`` blocks run and no temporary
    output is left behind."""

    def raise_cancelled(signum, frame):
        # Python runs handlers in the main thread: the exception unwinds the engine from where it is.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise Cancelled("cancelled: the engine process was asked to stop")

    signal.signal(signal.SIGTERM, raise_cancelled)
