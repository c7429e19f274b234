"""How ``evaluate`` reads labels: 0/1 and 0/255, an ignore value for unlabelled pixels, and a clear refusal
of anything else (other values, sizes that differ from the images), on real LEVIR-CD pairs."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from geochange.engine.errors import RasterError
from geochange.engine.evaluate import evaluate_folder
from geochange.engine.package import load_package
from geochange.engine.rasters import read_image

GEOCHANGE = [sys.executable, "-m", "geochange.engine"]


def write_png(path: Path, image: np.ndarray) -> Path:
    """``(bands, H, W)`` uint8 ``image`` as a PNG."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="PNG", width=image.shape[2], height=image.shape[1],
                           count=image.shape[0], dtype="uint8") as dst:
            dst.write(image)
    return path


@pytest.fixture(scope="module")
def levir_pair(shared_data, tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """A, B (128 px PNGs) and the 0/255 label band of a crop of a LEVIR-CD sample with change in it."""
    levir, folder = shared_data / "levir_cd", tmp_path_factory.mktemp("levir_crop")
    name = next(p.name for p in sorted((levir / "label").iterdir()) if read_image(p)[:, :128, :128].any())
    a, b = (write_png(folder / f"{date}.png", read_image(levir / date / name)[:, :128, :128]) for date in "AB")
    return a, b, read_image(levir / "label" / name)[0, :128, :128]


@pytest.fixture(scope="module")
def tinycd(tinycd_package):
    return load_package(tinycd_package)


def dataset(root: Path, pair, labels: dict[str, np.ndarray]) -> Path:
    """A folder dataset of ``pair`` once per label: ``label/NAME.png`` holds ``labels[NAME]``."""
    for folder in ("A", "B", "label"):
        (root / folder).mkdir(parents=True)
    for name, label in labels.items():
        (root / "A" / f"{name}.png").symlink_to(pair[0])
        (root / "B" / f"{name}.png").symlink_to(pair[1])
        write_png(root / "label" / f"{name}.png", label[None])
    return root


def test_0_1_labels_with_unlabelled_pixels_count_only_the_labelled_ones(levir_pair, tinycd, tmp_path):
    truth = levir_pair[2]
    root = dataset(tmp_path / "full", levir_pair, {"x": truth})
    (root / "A" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden files are not images
    full = evaluate_folder(tinycd, root, device="cpu")
    # The same label as 0/1, unlabelled (255) on the left half in one copy, on the right half in another:
    # together they count every pixel once, so their confusion is the full label's.
    halves = {}
    for name, columns in (("left", np.s_[:, :64]), ("right", np.s_[:, 64:])):
        halves[name] = (truth > 0).astype(np.uint8)
        halves[name][columns] = 255
    root = dataset(tmp_path / "halves", levir_pair, halves)
    sparse = evaluate_folder(tinycd, root, device="cpu", ignore_value=255)
    assert sparse["images"] == 2 and sparse["confusion"] == full["confusion"]
    assert full["confusion"]["tp"] > 0 and full["global"]["f1"] > 0.5

    # Without the ignore value, 0/1/255 is ambiguous: refused with the values found and the fix.
    with pytest.raises(RasterError, match=r"label/left\.png: label values 0, 1, 255; .*give --ignore-value 255"):
        evaluate_folder(tinycd, root, device="cpu")


def test_other_label_values_are_refused_naming_the_file(levir_pair, tinycd, tmp_path):
    classes = np.where(levir_pair[2] > 0, 2, 0).astype(np.uint8)
    classes[:10] = 127
    with pytest.raises(RasterError, match=r"label/x\.png: label values 0, 2, 127; a label must be 0 \(no change\) "
                                          r"and 1 or 255 \(change\)"):
        evaluate_folder(tinycd, dataset(tmp_path / "classes", levir_pair, {"x": classes}), device="cpu")


def test_a_float_label_with_nan_for_unlabelled_pixels_takes_ignore_value_nan():
    """The hint said to give ignore_value nan, which then refused the label: NaN equals nothing."""
    from geochange.engine.evaluate import change_label

    raw = np.array([[0, 1, np.nan]], np.float32)
    with pytest.raises(RasterError, match="if nan marks unlabelled pixels, give --ignore-value nan"):
        change_label(raw, "x")
    change, labelled = change_label(raw, "x", float("nan"))
    assert labelled.tolist() == [[True, True, False]] and change.tolist() == [[False, True, False]]


def test_a_label_in_colour_is_read_where_its_colours_agree_and_refused_where_not(levir_pair, tinycd, tmp_path):
    """Only its first band was read: change drawn in green (0, 255, 0) became no change, without a word."""
    grey = np.where(levir_pair[2] > 0, 255, 0).astype(np.uint8)
    opaque = np.full_like(grey, 255)
    for name, colours in (("rgb", [grey] * 3), ("grey_alpha", [grey, opaque]), ("rgba", [grey] * 3 + [opaque]),
                          ("green", [np.zeros_like(grey), grey, np.zeros_like(grey)])):
        root = dataset(tmp_path / name, levir_pair, {"x": grey})
        write_png(root / "label" / "x.png", np.stack(colours))
        if name != "green":
            assert evaluate_folder(tinycd, root, device="cpu")["confusion"]["tp"] > 0
        else:
            with pytest.raises(RasterError, match=r"label/x\.png: a label of 3 bands whose colours differ"):
                evaluate_folder(tinycd, root, device="cpu")


def test_files_that_describe_an_image_are_no_images(levir_pair, tmp_path):
    """GDAL's statistics beside a tile (gdalinfo -stats, QGIS) were taken for an image: 'not a readable raster'."""
    from geochange.engine.evaluate import dataset_pairs

    root = dataset(tmp_path / "described", levir_pair, {"x": levir_pair[2]})
    for side in ("x.png.aux.xml", "x.pgw", "x.png.ovr"):
        (root / "A" / side).write_text("<PAMDataset/>")
    assert [a.name for a, _, _ in dataset_pairs(root)] == ["x.png"]


def test_a_label_of_another_size_is_refused_naming_both_files(levir_pair, tinycd, tmp_path):
    root = dataset(tmp_path / "small", levir_pair, {"x": levir_pair[2][:100]})
    with pytest.raises(RasterError, match=rf"{root}/label/x\.png is 128x100 px but {root}/A/x\.png is 128x128 px"):
        evaluate_folder(tinycd, root, device="cpu")


def test_the_sparse_taizhou_label_needs_its_ignore_value(shared_data):
    from geochange.engine.evaluate import change_label  # the one reading of labels, the trainer's too

    path = shared_data / "landsat_taizhou" / "label_sparse.tif"
    raw = read_image(path)[0]
    change, labelled = change_label(raw, path, ignore_value=255)
    assert np.array_equal(change, raw == 1) and np.array_equal(labelled, raw != 255)
    assert change.any() and not labelled.all()
    with pytest.raises(RasterError, match=r"label_sparse\.tif: label values 0, 1, 255.*--ignore-value 255"):
        change_label(raw, path)


def test_cli_evaluate_ignore_value(levir_pair, tinycd_package, tmp_path):
    labels = (levir_pair[2] > 0).astype(np.uint8)
    labels[:, :50] = 255
    root = dataset(tmp_path / "sparse", levir_pair, {"x": labels})
    done = subprocess.run([*GEOCHANGE, "evaluate", "--model", str(tinycd_package), "--data", str(root),
                           "--device", "cpu", "--ignore-value", "255", "--json", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sum(json.loads((tmp_path / "m.json").read_text())["confusion"].values()) == 128 * 78


def test_the_trainer_reads_labels_the_same_way(shared_data):
    """A raster pair's label is checked whole when the dataset is built, not chip by chip during training
    (a chip may hold the 255 of a sparse label without its 1)."""
    from geochange.trainer.data import IGNORE, build_splits

    taizhou = shared_data / "landsat_taizhou"
    spec = {"pre": str(taizhou / "pre_2000.tif"), "post": str(taizhou / "post_2003.tif"),
            "label": str(taizhou / "label_sparse.tif"), "chip": 200, "split": {"val": 0.25, "test": 0.25}}
    with pytest.raises(RasterError, match=r"label_sparse\.tif: label values 0, 1, 255;.* give ignore_value: 255"):
        build_splits([spec])
    items = build_splits([{**spec, "ignore_value": 255}])
    labels = np.concatenate([item.load()[2].ravel() for split in items.values() for item in split])
    raw = read_image(taizhou / "label_sparse.tif")[0]
    assert sorted(np.unique(labels)) == [0, 1, IGNORE]
    assert [np.count_nonzero(labels == v) for v in (0, 1, IGNORE)] == [np.count_nonzero(raw == v) for v in (0, 1, 255)]


def test_float_db_sar_is_evaluated_as_its_8_bit_image_with_sar_db(shared_data, tmp_path):
    """The zoo's flood model on OMBRIA tiles whose 8-bit SAR (backscatter mapped from -25..0 dB) is stored as float
    dB: with --sar-db the same metrics as the 8-bit tiles; without, an error that says dB, not a blank date."""
    from geochange.engine.zoo import zoo_path

    ombria = shared_data / "ombria"
    names = sorted(p.stem for p in (ombria / "A").iterdir())[:2]
    model = load_package(zoo_path("m2cd_mit_b0_flood"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # plain images, as the dataset's PNGs
        for kind in ("8bit", "db"):
            for folder in ("A", "B", "label"):
                (tmp_path / kind / folder).mkdir(parents=True)
                for name in names:
                    image = read_image(ombria / folder / f"{name}.png")
                    if folder == "B" and kind == "db":
                        image = (image / 255.0 * 25.0 - 25.0).astype(np.float32)
                    with rasterio.open(tmp_path / kind / folder / f"{name}.tif", "w", driver="GTiff",
                                       count=image.shape[0], height=image.shape[1], width=image.shape[2],
                                       dtype=image.dtype) as dst:
                        dst.write(image)
        eight_bit = evaluate_folder(model, tmp_path / "8bit", device="cpu", precision="fp32", backend="eager")
        db = evaluate_folder(model, tmp_path / "db", device="cpu", precision="fp32", backend="eager", sar_db=True)
        with pytest.raises(RasterError, match=r"the post image holds backscatter in dB, not linear power: \d+% of"):
            evaluate_folder(model, tmp_path / "db", device="cpu", precision="fp32", backend="eager")
    assert eight_bit["global"]["f1"] == pytest.approx(db["global"]["f1"], abs=1e-4) and eight_bit["global"]["f1"] > 0
    # NaN, a float tile's nodata: no metric counts those pixels (before: "the model gave NaN").
    tile = tmp_path / "db" / "B" / f"{names[0]}.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(tile, "r+") as dst:
            sar = dst.read()
            sar[:, :64] = np.nan
            dst.write(sar)
        holed = evaluate_folder(model, tmp_path / "db", device="cpu", precision="fp32", backend="eager", sar_db=True)
    assert sum(holed["confusion"].values()) == sum(db["confusion"].values()) - 64 * 256


def test_labels_that_mark_change_with_1_in_one_image_and_255_in_another_are_refused(levir_pair, tinycd, tmp_path):
    """A sparse 0/1 label's image without a 1 passed as a 0/255 label, its unlabelled pixels (255) counted as
    change; refused before any prediction, in evaluate and in the trainer's folder datasets."""
    from geochange.trainer.data import FolderSource

    ones = (levir_pair[2] > 0).astype(np.uint8)
    unlabelled_half = np.zeros_like(ones)
    unlabelled_half[:, 64:] = 255
    root = dataset(tmp_path / "sparse", levir_pair, {"a": ones, "b": unlabelled_half})
    with pytest.raises(RasterError, match=r"label/a\.png marks change with 1 and .*label/b\.png with 255: .* give "
                                          r"--ignore-value 255"):
        evaluate_folder(tinycd, root, device="cpu")
    with pytest.raises(RasterError, match=r"label/a\.png marks change with 1 .* give ignore_value: 255"):
        FolderSource("sparse", root)
    sparse = evaluate_folder(tinycd, root, device="cpu", ignore_value=255)
    assert sum(sparse["confusion"].values()) == 128 * 128 + 128 * 64
