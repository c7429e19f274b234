"""Atomic output: write under a temporary name beside the target, rename on success."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The temporary keeps the target's suffix so that drivers chosen by extension still work; side
    files a driver writes next to it (a shapefile's .dbf/.shx/.prj, GDAL's .aux.xml) are renamed
    with it. On any exception (a cancel included) the temporaries are removed, the target untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = f".{path.stem}.{uuid.uuid4().hex[:8]}.partial"
    tmp = path.with_name(stem + path.suffix)
    try:
        yield tmp
        for part in sorted(path.parent.glob(stem + ".*")):
            os.replace(part, path.with_name(path.stem + part.name[len(stem):]))
    finally:
        remove_quietly(tmp)


def remove_quietly(path: Path) -> None:
    """Remove a file or folder and its side files (same stem) if present."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    for p in path.parent.glob(stem + ".*") if path.parent.exists() else []:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
