"""Which window and overlap to use for models trained on small tiles: F1 of the change class on whole labelled
rasters larger than a tile, for each (tile, overlap), through `geochange detect`'s own path.

    python bench/tile_overlap.py [--out bench/tile_overlap.md]

Rasters: the georeferenced LEVIR-CD test tile (1024 px, TinyCD with its authors' LEVIR weights, imported into
a package that records 256) and the two optical-SAR river floods of flood_optical_sar (990x554, 827x465 px;
the zoo's M2CD flood model, trained on 256 px OMBRIA tiles). Data from ../shared/data (or
GEOCHANGE_SHARED_DATA); the TinyCD authors' weights are imported into a temporary folder.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import rasterio
from rasterio.transform import from_origin

from geochange.engine.contracts import MASK_CHANGE
from geochange.engine.detect import detect
from geochange.engine.evaluate import change_label
from geochange.engine.hardware import cpu_name
from geochange.engine.importers import import_weights
from geochange.engine.metrics import ConfusionMeter
from geochange.engine.package import load_package
from geochange.engine.process import configure_process
from geochange.engine.rasters import read_image
from geochange.engine.shared_data import shared_data_dir
from geochange.engine.zoo import zoo_index

SHARED = shared_data_dir()
SETTINGS = [(256, 0), (256, 32), (256, 64), (256, 128), (512, 0), (512, 64), (1024, 0)]


def georeferenced(png: Path, folder: Path) -> Path:
    """A PNG of the flood set written as a GeoTIFF (same pixels, an arbitrary UTM placement), as detect wants."""
    pixels = read_image(png)
    out = folder / f"{png.parent.name}_{png.stem}.tif"
    with rasterio.open(out, "w", driver="GTiff", width=pixels.shape[2], height=pixels.shape[1], count=len(pixels),
                       dtype=pixels.dtype, crs="EPSG:32630", transform=from_origin(500000, 5700000, 1, 1)) as dst:
        dst.write(pixels)
    return out


def f1(model, pairs, tile: int, overlap: int, work: Path) -> float:
    meter = ConfusionMeter()
    for pre, post, label in pairs:
        out = work / "out"
        result = detect(pre, post, model, probability=out / "p.tif", mask=out / "m.tif", polygons=out / "c.gpkg",
                        tile=tile, overlap=overlap, device="cpu")
        with rasterio.open(result.mask) as src, rasterio.open(label) as truth:
            change, labelled = change_label(truth.read(1), label)
            meter.add(src.read(1) == MASK_CHANGE, change, labelled)
    return meter.summary()["global"]["f1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).with_name("tile_overlap.md")))
    args = parser.parse_args()
    configure_process()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        levir = SHARED / "levir_tile_georef"
        cases = [("TinyCD, authors' LEVIR weights",
                  import_weights("tinycd", SHARED / "weights" / "tinycd_levir_official.pth",
                                 work / "tinycd.safetensors"),
                  "LEVIR-CD test_7 (1024 px)", [(levir / "pre.tif", levir / "post.tif", levir / "label.tif")])]
        if "m2cd_mit_b0_flood" in zoo_index():
            floods = sorted((SHARED / "flood_optical_sar").iterdir())
            cases.append(("M2CD-MiT-b0, zoo m2cd_mit_b0_flood", "m2cd_mit_b0_flood",
                          "flood_optical_sar (2 pairs, 990x554 and 827x465 px)",
                          [tuple(georeferenced(d / f"{p}.png", work) for p in ("A", "B", "label")) for d in floods]))
        lines = ["# Window and overlap for models trained on small tiles", "",
                 f"CPU: {cpu_name()}. F1 of the change class, global over each raster set, through `detect`.", "",
                 "| model | data | " + " | ".join(f"{t}/{o}" for t, o in SETTINGS) + " |",
                 "|---|---|" + "---|" * len(SETTINGS)]
        for label, model, data, pairs in cases:
            package = load_package(model)
            scores = [f1(package, pairs, t, o, work) for t, o in SETTINGS]
            lines.append(f"| {label} | {data} | " + " | ".join(f"{s:.4f}" for s in scores) + " |")
            print(lines[-1], flush=True)
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
