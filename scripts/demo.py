"""``make demo``: the TinyCD authors' weights on a real georeferenced LEVIR-CD tile, end to end; then the
zoo's flood model on OMBRIA test tiles.

Imports the weights into a package (once), detects changes, prints the polygon count and changed
area, and draws ``overview.png``: pre | post | change polygons over post. With the zoo's
``FLOOD_MODEL``, detects floods on four OMBRIA test tiles (PNG, paired pixel for pixel) and draws
``flood_overview.png``: a row per tile, optical before | SAR after | predicted | EMS label.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from geochange.engine.atomic import atomic_path
from geochange.engine.contracts import MASK_CHANGE, OUTPUT_NAMES
from geochange.engine.detect import detect
from geochange.engine.errors import RasterError
from geochange.engine.evaluate import change_label
from geochange.engine.importers import import_weights
from geochange.engine.process import configure_process
from geochange.engine.progress import TqdmProgress
from geochange.engine.rasters import open_raster, read_image
from geochange.engine.shared_data import shared_data_dir
from geochange.engine.zoo import zoo_index


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


FLOOD_MODEL = "m2cd_mit_b0_flood"
FLOOD_TILES = 4


def flood_overview(ombria_test: Path, out: Path, device: str) -> tuple[Path, list[float]]:
    """The flood model on the first ``FLOOD_TILES`` test tiles flooded between 10 and 60 %; the picture
    and each tile's change-class F1."""
    from skimage.io import imsave

    from geochange.engine.metrics import ConfusionMeter

    rows, scores = [], []
    for label_path in sorted(p for p in (ombria_test / "label").iterdir() if not p.name.startswith(".")):
        label = change_label(read_image(label_path)[0], label_path)[0]
        if not 0.1 <= label.mean() <= 0.6:
            continue
        name = label_path.name
        folder = out / "flood" / Path(name).stem
        outputs = {k: folder / v for k, v in OUTPUT_NAMES.items()}
        detect(ombria_test / "A" / name, ombria_test / "B" / name, FLOOD_MODEL, **outputs, device=device)
        predicted = read_image(outputs["mask"])[0] == MASK_CHANGE
        meter = ConfusionMeter()
        meter.add(predicted, label, np.ones_like(label))
        scores.append(meter.summary()["global"]["f1"])
        optical = read_image(ombria_test / "A" / name)[:3].transpose(1, 2, 0)
        sar = np.repeat(read_image(ombria_test / "B" / name)[0][..., None], 3, axis=2)
        gap = np.full((optical.shape[0], 8, 3), 255, dtype=np.uint8)
        panels = [optical, sar] + [np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=2)
                                   for m in (predicted, label)]
        rows.append(np.concatenate([x for panel in panels for x in (panel, gap)][:-1], axis=1))
        if len(rows) == FLOOD_TILES:
            break
    if not rows:
        raise RasterError(f"{ombria_test}: no test tile is 10 to 60 % flooded")
    space = np.full((8, rows[0].shape[1], 3), 255, dtype=np.uint8)
    picture = out / "flood_overview.png"
    with atomic_path(picture) as tmp:
        imsave(tmp, np.concatenate([x for row in rows for x in (row, space)][:-1]).astype(np.uint8),
               check_contrast=False)
    return picture, scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=shared_data_dir(), help="the shared data folder")
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    configure_process()
    tile = args.data / "levir_tile_georef"
    if not tile.is_dir():
        print(f"demo data not found: {tile}", file=sys.stderr)
        return 2
    package = args.out / "tinycd_levir.safetensors"
    if not package.exists():
        import_weights("tinycd", args.data / "weights" / "tinycd_levir_official.pth", package)
    outputs = {k: args.out / v for k, v in OUTPUT_NAMES.items()}
    result = detect(tile / "pre.tif", tile / "post.tif", package, **outputs, device=args.device,
                    min_area=20.0, simplify=0.5, progress=TqdmProgress(unit="%"))
    picture = overview(tile / "pre.tif", tile / "post.tif", result.polygons, args.out / "overview.png")
    print(f"{result.polygon_count} change polygons, {result.changed_area_m2:,.0f} m2 changed")
    for path in (*outputs.values(), picture):
        print(f"  {path}")
    if FLOOD_MODEL in zoo_index():
        picture, scores = flood_overview(args.data / "ombria_full" / "test", args.out, args.device)
        print(f"{FLOOD_MODEL} on {len(scores)} OMBRIA test tiles: F1 " + ", ".join(f"{f:.3f}" for f in scores))
        print(f"  {picture}  (optical before | SAR after | predicted | EMS label)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
