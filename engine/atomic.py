"""Atomic output: files written under temporary names beside their targets, renamed on success."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path


class AtomicOutputs:
    """Outputs that take their final names together, or not at all.

    ``path(final)`` names a temporary beside ``final`` that keeps its suffix, so that drivers chosen
    by extension still work; side files a driver writes next to it (a shapefile's .dbf/.shx/.prj,
    GDAL's .aux.xml) go with it. Used as a context manager, the block's success commits every output
    and any exception (a cancel included) removes the temporaries, leaving the targets untouched.
    """

    def __init__(self):
        self._outputs: list[tuple[Path, Path]] = []  # (temporary, final)

    def path(self, final: str | os.PathLike) -> Path:
        final = Path(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        temporary = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:8]}.partial{final.suffix}")
        self._outputs.append((temporary, final))
        return temporary

    def __enter__(self) -> AtomicOutputs:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                self.commit()
        finally:
            self.discard()

    def commit(self) -> None:
        """Rename every temporary (and its side files) to its final name. SIGINT and SIGTERM wait
        until the renames are over; if one of them came, or a rename fails, those done are undone and
        the files they replaced put back, so a run that does not end well leaves the targets as they were."""
        moves = []
        for temporary, final in self._outputs:
            stem = temporary.name[:len(temporary.name) - len(final.suffix)]  # ".NAME.TOKEN.partial"
            for part in sorted({temporary, *temporary.parent.glob(glob.escape(stem) + ".*")}):
                if not part.exists():
                    continue
                target = final.with_name(final.stem + part.name[len(stem):])
                if target.is_dir():
                    raise IsADirectoryError(f"{target}: a folder is in the way of this output")
                moves.append((part, target))
        token = uuid.uuid4().hex[:8]
        with _signals_held() as caught:
            done = []  # (temporary, target, where the target's old file went)
            try:
                for part, target in moves:
                    replaced = None
                    if os.path.lexists(target):
                        replaced = target.with_name(f".{target.name}.{token}.replaced")
                        os.replace(target, replaced)
                    done.append((part, target, replaced))
                    os.replace(part, target)
                if caught:
                    raise InterruptedError("a signal came while the outputs were renamed")
            except BaseException:
                for part, target, replaced in reversed(done):
                    if not os.path.lexists(part):
                        os.replace(target, part)
                    if replaced is not None:
                        os.replace(replaced, target)
                raise
            for _, _, replaced in done:
                if replaced is not None:
                    remove_quietly(replaced)
        self._outputs = []

    def discard(self) -> None:
        """Remove the temporaries not committed."""
        for temporary, _ in self._outputs:
            remove_quietly(temporary)
        self._outputs = []


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    with AtomicOutputs() as outputs:
        yield outputs.path(path)


@contextlib.contextmanager
def _signals_held():
    """Record SIGINT and SIGTERM instead of acting on them until the block ends, then let their
    handlers act. Only the main thread can set handlers; elsewhere nothing is held."""
    caught: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(number)
            if handler is not None and handler != signal.SIG_IGN:  # None: set outside Python
                previous[number] = handler
                signal.signal(number, lambda number, frame: caught.append(number))
    try:
        yield caught
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in caught:
            signal.raise_signal(number)


def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def remove_quietly(path: Path) -> None:
    """Remove a file or folder and its side files (same stem) if present."""
    for p in path.parent.glob(glob.escape(_stem(path)) + ".*") if path.parent.exists() else []:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
