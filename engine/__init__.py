"""The GeoChange engine (QGIS-free): model packages, tiled inference over raster pairs, vectors, CLI."""


def load_package(path, device="cpu"):
    """Load a model package; see ``geochange.engine.package.load_package``."""
    from geochange.engine.package import load_package as _load

    return _load(path, device)
