"""``make demo``: the TinyCD authors' weights on a real georeferenced LEVIR-CD tile, end to end.

Imports the weights into a package (once), detects changes, prints the polygon count and changed
area, and draws ``overview.png``: pre | post | change polygons over post.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from geochange.engine.atomic import atomic_path
from geochange.engine.cli import OUTPUT_NAMES
from geochange.engine.importers import import_weights
from geochange.engine.inference import detect
from geochange.engine.progress import TqdmProgress
from geochange.engine.rasters import open_raster


def overview(pre_path: Path, post_path: Path, polygons_path: Path, out: Path) -> Path:
    """Three panels side by side; the written polygons' outlines in red on the post image."""
    from osgeo import ogr
    from rasterio.features import rasterize
    from shapely import wkb
    from skimage.io import imsave
    from skimage.segmentation import find_boundaries

    source = ogr.Open(str(polygons_path))
    geometries = [wkb.loads(bytes(f.GetGeometryRef().ExportToWkb())) for f in source.GetLayer()]
    source = None
    with open_raster(pre_path) as a, open_raster(post_path) as b:
        pre, post = a.read([1, 2, 3]).transpose(1, 2, 0), b.read([1, 2, 3]).transpose(1, 2, 0)
        burnt = rasterize(((g, i) for i, g in enumerate(geometries, start=1)), out_shape=post.shape[:2],
                          transform=b.transform, dtype="int32") if geometries else np.zeros(post.shape[:2])
    outlined = post.copy()
    edges = find_boundaries(burnt, mode="inner")
    outlined[edges] = (255, 0, 0)
    gap = np.full((pre.shape[0], 8, 3), 255, dtype=np.uint8)
    with atomic_path(out) as tmp:
        imsave(tmp, np.concatenate([pre, gap, post, gap, outlined], axis=1).astype(np.uint8),
               check_contrast=False)
    return out


def main(argv=None) -> int:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=shared, help="the shared data folder")
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    tile = args.data / "levir_tile_georef"
    if not tile.is_dir():
        print(f"demo data not found: {tile}", file=sys.stderr)
        return 2
    package = args.out / "tinycd_levir.safetensors"
    if not package.exists():
        import_weights("tinycd", args.data / "weights" / "tinycd_levir_official.pth", package)
    outputs = {k: args.out / v for k, v in OUTPUT_NAMES.items()}
    result = detect(tile / "pre.tif", tile / "post.tif", package, **outputs, device=args.device,
                    min_area=20.0, simplify=0.5e-5, progress=TqdmProgress())
    picture = overview(tile / "pre.tif", tile / "post.tif", result.polygons, args.out / "overview.png")
    print(f"{result.polygon_count} change polygons, {result.changed_area_m2:,.0f} m2 changed")
    for path in (*outputs.values(), picture):
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
