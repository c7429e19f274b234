"""Where the shared real data lies: the inputs of the tests, the demo and the benchmarks, kept beside the
repository (``../shared/data``) and never copied into it."""
from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path:
    """The folder named by ``GEOCHANGE_SHARED_DATA``, else ``../shared/data`` beside the repository root."""
    return Path(os.environ.get("GEOCHANGE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
