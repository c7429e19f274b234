"""Keep the engine's native libraries apart from the copies QGIS itself has loaded.

On Linux the QGIS executables (``qgis``, ``qgis_process``) link the system GEOS, so its symbols sit
in the process's global scope and take precedence over the GEOS that a shapely wheel bundles:
shapely then calls a GEOS older than the one it was built for and fails (e.g. "WKB output dimension
must be 2 or 3" with GEOS 3.11) or mixes two GEOS copies in one call. Importing shapely with
``RTLD_DEEPBIND`` makes its extension modules resolve GEOS in their own dependencies first.
"""
from __future__ import annotations

import os
import sys


def import_shapely_with_its_own_geos() -> None:
    """Import shapely so that it binds to its bundled GEOS; a no-op where it is already imported
    (nothing can be rebound then) and off Linux (other loaders do not interpose symbols this way)."""
    deepbind = getattr(os, "RTLD_DEEPBIND", 0)
    if "shapely" in sys.modules or not deepbind or not sys.platform.startswith("linux"):
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | deepbind)
    try:
        import shapely  # noqa: F401  (imported for its side effect on the loader)
    finally:
        sys.setdlopenflags(flags)
