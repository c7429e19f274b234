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

    The temporary keeps the target's suffix so that drivers chosen by extension still work.
    On any exception (a cancel included) the temporary is removed and the target is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        remove_quietly(tmp)


def remove_quietly(path: Path) -> None:
    """Remove a file or folder (and GDAL's side files) if present."""
    for p in [path, *path.parent.glob(path.name + ".*")] if path.parent.exists() else []:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
