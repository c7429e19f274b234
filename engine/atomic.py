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

from geochange.engine.errors import OutputError, output_error

_TOKEN_DIGITS = 8  # hex digits of the token that tells one run's temporaries from another's
# Files beside an output that describe its data (a shapefile's by its stem; GDAL's and SQLite's by its name): an
# earlier output's go with it, or readers would take its CRS, encoding, index, statistics or journal for the new
# one's. A user's own files beside it (a QGIS style, .qml) stay.
_SIDE_FILES_BY_STEM = {".shp": (".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx")}
_SIDE_FILES_BY_NAME = (".aux.xml", ".ovr", ".msk", "-wal", "-shm", "-journal")


def new_token() -> str:
    """What tells one run's temporaries from another's."""
    return uuid.uuid4().hex[:_TOKEN_DIGITS]


def _temporary_name(stem: str, token: str, suffix: str) -> str:
    """``.NAME.TOKEN.partial.EXT`` for ``NAME.EXT``: hidden, one run's, and keeping the suffix."""
    return f".{stem}.{token}.partial{suffix}"


class AtomicOutputs:
    """Outputs that take their final names together, or not at all.

    ``path(final)`` names a temporary beside ``final`` that keeps its suffix, so that drivers chosen
    by extension still work; side files a driver writes next to it (a shapefile's .dbf/.shx/.prj,
    GDAL's .aux.xml) go with it. Used as a context manager, the block's success commits every output
    and any exception (a cancel included) removes the temporaries, leaving the targets untouched, and
    the folders made for them. ``exclusive``: each output folder is locked until the outputs are
    renamed or removed (a second such run into it is refused), and the temporaries of the same names
    that a killed run left there are removed. ``inputs``: the files the run reads; an output naming one of
    them, or a file another output names, is refused (its rename would replace what the run read).
    """

    def __init__(self, *, exclusive: bool = False, inputs=()):
        self._outputs: list[tuple[Path, Path]] = []  # (temporary, final)
        self._inputs = inputs
        self._exclusive = exclusive
        self._made: list[Path] = []  # folders made here
        self._locks = contextlib.ExitStack()
        self._locked: dict[Path, bool] = {}  # folder: whether its lock is held

    def path(self, final: str | os.PathLike) -> Path:
        final = Path(final)
        check_outputs([*(earlier for _, earlier in self._outputs), final], self._inputs)
        self._make_folder(final.parent)
        folder = Path(os.path.realpath(final.parent))  # one lock a folder, however its path is spelt
        if self._exclusive and folder not in self._locked:
            self._locked[folder] = self._locks.enter_context(folder_lock(folder))
        if self._locked.get(folder):
            # Under the lock no other run writes here: temporaries of this name not ours are a dead run's.
            ours = tuple(temporary.name[:-len(temporary.suffix) or None] for temporary, _ in self._outputs)
            for left in temporaries(final):
                if not left.name.startswith(ours):
                    remove_quietly(left)
        temporary = final.with_name(_temporary_name(final.stem, new_token(), final.suffix))
        self._outputs.append((temporary, final))
        return temporary

    def _make_folder(self, folder: Path) -> None:
        missing = missing_folders([folder])
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise OutputError(f"{folder}: not a folder; a file is in the way of the outputs") from None
        except OSError as error:
            raise output_error(folder, error.strerror) from None
        self._made += missing

    def __enter__(self) -> AtomicOutputs:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        committed = False
        try:
            if kind is None:
                self.commit()
                committed = True
        finally:
            self.discard()
            self._locks.close()
            if not committed:
                remove_empty_folders(self._made)

    def commit(self) -> None:
        """Rename every temporary (and its side files) to its final name, removing the side files of an earlier
        output there that the new one has not. SIGINT and SIGTERM wait until the renames are over; if one of
        them came, or a rename fails, those done are undone and the files they replaced put back, so a run that
        does not end well leaves the targets as they were."""
        moves = []  # (temporary, its final name), or (None, an earlier output's side file to remove)
        for temporary, final in self._outputs:
            stem = temporary.name[:len(temporary.name) - len(final.suffix)]  # ".NAME.TOKEN.partial"
            for part in sorted({temporary, *temporary.parent.glob(glob.escape(stem) + ".*")}):
                if not part.exists():
                    continue
                target = final.with_name(final.stem + part.name[len(stem):])
                if target.is_dir():
                    raise OutputError(f"{target}: a folder is in the way of this output")
                moves.append((part, target))
        targets = {target for _, target in moves}
        for _, final in self._outputs:
            sides = [final.stem + suffix for suffix in _SIDE_FILES_BY_STEM.get(final.suffix.lower(), ())]
            for side in (final.with_name(name) for name in sides + [final.name + s for s in _SIDE_FILES_BY_NAME]):
                if side not in targets and os.path.lexists(side):
                    moves.append((None, side))
        token = new_token()
        with _signals_held() as caught:
            done = []  # (temporary, target, where the target's old file went)
            try:
                for part, target in moves:
                    replaced = None
                    if os.path.lexists(target):
                        replaced = target.with_name(f".{target.name}.{token}.replaced")
                        os.replace(target, replaced)
                    done.append((part, target, replaced))
                    if part is not None:
                        os.replace(part, target)
                if caught:
                    raise InterruptedError("a signal came while the outputs were renamed")
            except BaseException as error:
                for part, target, replaced in reversed(done):
                    if part is not None and not os.path.lexists(part):
                        os.replace(target, part)
                    if replaced is not None:
                        os.replace(replaced, target)
                if isinstance(error, OSError) and not isinstance(error, (OutputError, InterruptedError)):
                    raise output_error(target, error.strerror or str(error)) from None  # a rename failed
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


def check_outputs(outputs, inputs=()) -> None:
    """Refuse an output that names one of the files a run reads (``inputs``: paths, or vector layers as
    ``FILE|layername=NAME``; None for one not given), whose rename would replace it, or that another output names.
    Called before a run, so that nothing runs for outputs it cannot write, and again as each output is made.
    Files are told by device and inode, as ``same_file``, each looked up once: a run of thousands of pairs
    (``detect-many``) checks all their outputs against all their inputs."""
    files = {}
    for source in (str(source).partition("|")[0] for source in inputs if source is not None):
        files.setdefault(_identity(source), source)
    files.pop(None, None)
    seen = set()
    for final in (Path(output) for output in outputs if output is not None):
        source = files.get(_identity(final))
        if source is not None:
            raise OutputError(f"{final}: this output is also an input of the run ({source}); "
                              "choose another name for it")
        if os.path.realpath(final) in seen:
            raise OutputError(f"{final}: named for two outputs of the run; give each its own file")
        seen.add(os.path.realpath(final))


def _identity(path: str | os.PathLike) -> tuple[int, int] | None:
    """The device and inode of an existing file (what ``os.path.samefile`` compares); None for none."""
    try:
        status = os.stat(path)
    except (OSError, ValueError):  # missing (an output not written yet), or not a path
        return None
    return status.st_dev, status.st_ino


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one existing file (however spelt: links, ``..``)."""
    identity = _identity(a)
    return identity is not None and identity == _identity(b)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds. An
    OSError in the block (writing the temporary: a full disk) is an ``OutputError`` naming ``path``."""
    with AtomicOutputs() as outputs:
        temporary = outputs.path(path)
        try:
            yield temporary
        except OutputError:
            raise
        except OSError as error:
            raise output_error(path, error.strerror or str(error)) from None


def scratch_path(final: str | os.PathLike) -> Path:
    """A file for a run's intermediate data beside ``final``, named as ``final``'s temporaries are (with its
    own token), so that the next run into the folder removes it if this one is killed; the run removes it
    itself (``remove_quietly``), and makes it only once it holds the folder (``AtomicOutputs(exclusive=True)``),
    whose ``path`` would take it for a dead run's."""
    final = Path(final)
    return final.with_name(_temporary_name(final.stem, new_token(), ".scratch" + final.suffix))


def temporaries(final: Path) -> list[Path]:
    """The temporaries of ``final`` in its folder (``.NAME.xxxxxxxx.partial.EXT``) and their side files
    (``.partial.stage.tif``, ``.partial.gpkg-journal`` ...)."""
    return list(final.parent.glob(_temporary_name(glob.escape(final.stem), "?" * _TOKEN_DIGITS, "*")))


def missing_folders(folders) -> list[Path]:
    """Those of ``folders`` and their parents that are not there: what writing in them would make."""
    return sorted({p for folder in map(Path, folders) for p in (folder, *folder.parents) if not os.path.lexists(p)})


def remove_empty_folders(folders) -> None:
    """Remove those of ``folders`` (made for a run's outputs) that are empty, the deepest first."""
    for folder in sorted(folders, key=lambda folder: len(folder.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: something else is in it
            folder.rmdir()


def remove_left_temporaries(outputs) -> None:
    """Remove the temporaries a killed run left beside ``outputs``, in folders no other run is writing in."""
    for final in map(Path, outputs):
        if not final.parent.is_dir():
            continue
        try:
            with folder_lock(final.parent):
                for left in temporaries(final):
                    remove_quietly(left)
        except OutputError:  # another run holds the folder: the temporaries may be its own
            continue


@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold an exclusive ``flock`` on ``folder`` itself for the block, or refuse at once if another
    process holds it. The system lets go of it when a process dies, even by SIGKILL, and it leaves no
    file behind. Yields whether it is held: not where the system cannot lock a folder (no ``fcntl`` on
    Windows; NFS, whose exclusive locks need a file open for writing)."""
    try:
        import fcntl
        handle = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        yield False
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held = True
    except BlockingIOError:
        os.close(handle)
        raise OutputError(f"{folder}: another GeoChange run is writing its outputs into this folder; "
                          "wait until it ends or choose another folder") from None
    except OSError:
        held = False
    try:
        yield held
    finally:
        os.close(handle)


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
            with contextlib.suppress(OSError):  # gone, or a read-only folder: never an error over the first
                p.unlink()
