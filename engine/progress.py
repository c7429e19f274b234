"""One progress/cancel interface for every front end (tqdm in the CLI, feedback in QGIS)."""
from __future__ import annotations

import contextlib
import signal
import threading

from geochange.engine.errors import Cancelled

STOPPED = "cancelled: the engine process was asked to stop"
_stop = threading.Event()  # set by SIGTERM (``cancel_on_sigterm``)


def raise_if_stopped() -> None:
    """``Cancelled`` where this process was asked to stop, though a library caught the ``Cancelled`` the signal
    raised in it: PyTorch's tracing and compiling turn it into errors of their own, which the engine would take
    for a model that cannot be exported or compiled, or the program for a crash."""
    if _stop.is_set():
        raise Cancelled(STOPPED)


class Progress:
    """Silent progress; front ends override ``update``/``log``/``cancelled``.

    A detection reports each window read and each window run, and its phases after them (``Phases``);
    it calls ``check`` before every batch of windows and every band of rows written, and during the
    outputs' conversion, so a cancel takes effect within one batch.
    """

    def update(self, done: float, total: float) -> None:
        """``done`` of ``total`` is finished (windows, images, pairs, or a detection's percent; ``done``
        may be a fraction of a unit, and never goes back)."""

    def log(self, message: str) -> None:
        """A line for the user (warnings, summary)."""

    def cancelled(self) -> bool:
        return False

    def check(self) -> None:
        raise_if_stopped()
        if self.cancelled():
            raise Cancelled()


class Phases:
    """One run's progress made of parts that advance on their own (a detection's windows, its rows
    written, its outputs finished), each weighing its share of the run's time. ``part(name)`` is a part's
    own ``Progress``; the run's, the parts' fractions weighted by their shares, goes to ``progress`` in
    percent. Parts may advance side by side (rows are written while later windows run); the run's
    percent never goes back and is exactly 100 once every part is complete. Parts are advanced from one
    thread."""

    STEP = 0.1  # percent: finer moves are held back (GDAL reports a COG copy block by block)

    def __init__(self, progress: Progress, shares: dict[str, float]):
        self.progress, self.shares = progress, dict(shares)
        self._fractions = dict.fromkeys(self.shares, 0.0)
        self._reported: float | None = None

    def part(self, name: str) -> Progress:
        return _Part(self, name)

    def _advance(self, name: str, done: float, total: float) -> None:
        fraction = min(done / total, 1.0) if total > 0 else 1.0
        self._fractions[name] = max(self._fractions[name], fraction)
        # Summed in the shares' order, so that complete parts give the shares' sum exactly: 100 %.
        percent = 100 * (sum(self.shares[n] * f for n, f in self._fractions.items()) / sum(self.shares.values()))
        first, last = self._reported is None, percent == 100 and self._reported != 100
        if first or last or percent >= self._reported + self.STEP:
            self._reported = percent
            self.progress.update(percent, 100)


class _Part(Progress):
    """One part of ``Phases``: its ``update`` moves the run's progress; log and cancel are the run's."""

    def __init__(self, phases: Phases, name: str):
        self._phases, self._name = phases, name

    def update(self, done: float, total: float) -> None:
        self._phases._advance(self._name, done, total)

    def log(self, message: str) -> None:
        self._phases.progress.log(message)

    def cancelled(self) -> bool:
        return self._phases.progress.cancelled()


class TqdmProgress(Progress):
    """Progress bar on stderr for the CLI."""

    def __init__(self, description: str = "detect", unit: str = "win"):
        self._description, self._unit = description, unit
        self._bar = None

    def update(self, done: float, total: float) -> None:
        if self._bar is None:
            from tqdm import tqdm

            shape = "{l_bar}{bar}| [{elapsed}<{remaining}]" if self._unit == "%" else None  # no "37.2/100"
            self._bar = tqdm(total=total, desc=self._description, unit=self._unit, bar_format=shape)
        self._bar.n = round(done, 1)  # a detection's percent: tenths are enough
        self._bar.refresh()
        if done >= total:
            self._bar.close()

    def log(self, message: str) -> None:
        from tqdm import tqdm

        tqdm.write(message)

    def close(self) -> None:
        """End the bar where it stands, so that a failed run's error starts a line of its own and is the last."""
        if self._bar is not None:
            self._bar.close()


def cancel_on_sigterm():
    """Make SIGTERM (a job scheduler's or torchrun's stop, QGIS's cancel of a worker) a cancel: it
    raises ``Cancelled`` in the main thread, so the engine's ``finally`` blocks run and no temporary
    output is left behind. Returns the function that restores the handler before and forgets the stop
    (a process that keeps running after a cancel: a test)."""

    def raise_cancelled(signum, frame):
        # Python runs handlers in the main thread: the exception unwinds the engine from where it is.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        _stop.set()
        raise Cancelled(STOPPED)

    previous = signal.signal(signal.SIGTERM, raise_cancelled)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)
        _stop.clear()

    return restore


@contextlib.contextmanager
def sigterm_cancels(program: bool):
    """A program's command (``program``: run as one, not called by a library): SIGTERM cancels it
    (``cancel_on_sigterm``), and once it is over ends the process as by default. The handler left in place raised
    in Python's exit, with a traceback and status 0."""
    restore = cancel_on_sigterm() if program else None
    try:
        yield
    finally:
        if restore:
            restore()
