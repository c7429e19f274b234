"""How ``evaluate`` reads labels: 0/1 and 0/255, an ignore value and a GeoTIFF label's own nodata for unlabelled
pixels, and a clear refusal of anything else (other values, a nodata that is a class value, sizes that differ from
the images), on real LEVIR-CD pairs."""
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


def write_image(path: Path, image: np.ndarray, nodata: float | None = None) -> Path:
    """``(bands, H, W)`` ``image`` as a PNG or, named ``.tif``, a GeoTIFF declaring ``nodata``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="PNG" if path.suffix == ".png" else "GTiff", width=image.shape[2],
                           height=image.shape[1], count=image.shape[0], dtype=image.dtype.name, nodata=nodata) as dst:
            dst.write(image)
    return path


@pytest.fixture(scope="module")
def levir_pair(shared_data, tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """A, B (128 px PNGs) and the 0/255 label band of a crop of a LEVIR-CD sample with change in it."""
    levir, folder = shared_data / "levir_cd", tmp_path_factory.mktemp("levir_crop")
    name = next(p.name for p in sorted((levir / "label").iterdir()) if read_image(p)[:, :128, :128].any())
    a, b = (write_image(folder / f"{date}.png", read_image(levir / date / name)[:, :128, :128]) for date in "AB")
    return a, b, read_image(levir / "label" / name)[0, :128, :128]


@pytest.fixture(scope="module")
def tinycd(tinycd_package):
    return load_package(tinycd_package)


def dataset(root: Path, pair, labels: dict[str, np.ndarray], nodata: float | None = None) -> Path:
    """A folder dataset of ``pair`` once per label: ``label/NAME.png`` holds ``labels[NAME]``; with ``nodata``,
    GeoTIFFs ``{A,B,label}/NAME.tif``, the labels declaring it."""
    for folder in ("A", "B", "label"):
        (root / folder).mkdir(parents=True)
    for name, label in labels.items():
        if nodata is None:
            (root / "A" / f"{name}.png").symlink_to(pair[0])
            (root / "B" / f"{name}.png").symlink_to(pair[1])
            write_image(root / "label" / f"{name}.png", label[None])
        else:
            for folder, image in (("A", pair[0]), ("B", pair[1])):
                write_image(root / folder / f"{name}.tif", read_image(image))
            write_image(root / "label" / f"{name}.tif", label[None], nodata)
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
        write_image(root / "label" / "x.png", np.stack(colours))
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


def test_the_trainer_reads_labels_the_same_way(shared_data, tmp_path):
    """A raster pair's label is checked whole when the dataset is built, not chip by chip during training
    (a chip may hold the 255 of a sparse label without its 1). Its own nodata (Taizhou's 255) is not labelled, as
    the ignore value is; without it, 255 beside 0/1 is refused."""
    from geochange.trainer.data import IGNORE, build_splits

    taizhou = shared_data / "landsat_taizhou"
    spec = {"pre": str(taizhou / "pre_2000.tif"), "post": str(taizhou / "post_2003.tif"),
            "label": str(taizhou / "label_sparse.tif"), "chip": 200, "split": {"val": 0.25, "test": 0.25}}
    raw = read_image(taizhou / "label_sparse.tif")[0]
    for given in ({}, {"ignore_value": 255}):
        items = build_splits([{**spec, **given}])
        labels = np.concatenate([item.load()[2].ravel() for split in items.values() for item in split])
        assert sorted(np.unique(labels)) == [0, 1, IGNORE]
        assert [np.count_nonzero(labels == v) for v in (0, 1, IGNORE)] == [np.count_nonzero(raw == v)
                                                                             for v in (0, 1, 255)]
    with rasterio.open(taizhou / "label_sparse.tif") as src:
        profile = {**src.profile, "nodata": None}
    with rasterio.open(tmp_path / "label_sparse.tif", "w", **profile) as dst:
        dst.write(raw, 1)
    with pytest.raises(RasterError, match=r"label_sparse\.tif: label values 0, 1, 255;.* give ignore_value: 255"):
        build_splits([{**spec, "label": str(tmp_path / "label_sparse.tif")}])


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


def test_a_label_s_own_nodata_counts_in_no_metric(levir_pair, tinycd, tmp_path):
    """A GeoTIFF label's nodata was read as a label value: 255 beside 0/1, -1 or 9 refused without --ignore-value,
    and 255 in an image without a 1 counted as change. Its pixels now count in no metric, as --ignore-value's do on
    the PNG label; an explicit --ignore-value still leaves out its own pixels besides."""
    ones = (levir_pair[2] > 0).astype(np.uint8)
    sparse = ones.copy()
    sparse[:, :64] = 255
    png = evaluate_folder(tinycd, dataset(tmp_path / "png", levir_pair, {"x": sparse}), device="cpu", ignore_value=255)
    assert png["confusion"]["tp"] > 0 and sum(png["confusion"].values()) == 128 * 64
    for nodata, dtype in ((255, np.uint8), (-1, np.int16), (9, np.uint8)):
        label = ones.astype(dtype)
        label[:, :64] = nodata
        root = dataset(tmp_path / f"nodata{nodata}", levir_pair, {"x": label}, nodata)
        assert evaluate_folder(tinycd, root, device="cpu")["confusion"] == png["confusion"], nodata
    # Given as the ignore value too, it is what it was.
    given = evaluate_folder(tinycd, tmp_path / "nodata255", device="cpu", ignore_value=255)
    assert given["confusion"] == png["confusion"]

    # An ignore value beside the nodata: both left out; without it, its value is refused, the nodata named.
    both = ones.astype(np.int16)
    both[:, :32], both[:, 32:64] = -1, 255
    root = dataset(tmp_path / "both", levir_pair, {"x": both}, -1)
    assert evaluate_folder(tinycd, root, device="cpu", ignore_value=255)["confusion"] == png["confusion"]
    with pytest.raises(RasterError, match=r"label/x\.tif: label values 0, 1, 255 \(besides its nodata -1\); .*if 255 "
                                          r"marks unlabelled pixels, give --ignore-value 255$"):
        evaluate_folder(tinycd, root, device="cpu")

    # An image whose label holds no 1, beside one that does: its nodata 255 is no change, not counted at all.
    unlabelled = np.zeros_like(ones)
    unlabelled[:, :64] = 255
    root = dataset(tmp_path / "two", levir_pair, {"x": sparse, "y": unlabelled}, 255)
    two = evaluate_folder(tinycd, root, device="cpu")["confusion"]
    assert sum(two.values()) == 2 * 128 * 64 and (two["tp"], two["fn"]) == (png["confusion"]["tp"],
                                                                              png["confusion"]["fn"])


def test_a_label_s_nodata_that_is_a_class_value_is_refused(levir_pair, tinycd, tmp_path):
    """A 0/255 label saved with nodata 255 (or a 0/1 one with nodata 1) would lose its change without a word:
    refused, naming the fixes. A nodata of 0 (a label written with its image's profile) and a PNG's transparency
    (GDAL's nodata of a tRNS chunk) mark no unlabelled pixel: read as if not declared."""
    change = np.where(levir_pair[2] > 0, 255, 0).astype(np.uint8)
    ones = (change > 0).astype(np.uint8)
    plain = evaluate_folder(tinycd, dataset(tmp_path / "plain", levir_pair, {"x": ones}), device="cpu")["confusion"]
    zero = evaluate_folder(tinycd, dataset(tmp_path / "zero", levir_pair, {"x": ones}, 0), device="cpu")
    assert zero["confusion"] == plain and plain["tp"] > 0
    transparent = dataset(tmp_path / "transparent", levir_pair, {"x": change})
    write_image(transparent / "label" / "x.png", change[None], nodata=255)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(transparent / "label" / "x.png") as src:
            assert src.nodata == 255  # as GDAL reads the transparency
    assert evaluate_folder(tinycd, transparent, device="cpu")["confusion"] == plain
    for label, value in ((change, 255), (ones, 1)):
        root = dataset(tmp_path / f"change{value}", levir_pair, {"x": label}, value)
        with pytest.raises(RasterError, match=rf"label/x\.tif: its nodata value is {value}, and no other pixel of the "
                                              rf"dataset's labels marks change: if {value} marks change, its change "
                                              r"would count in no metric; then clear the nodata \(gdal_edit\.py "
                                              rf"-unsetnodata\)\. If {value} marks unlabelled pixels, give "
                                              rf"--ignore-value {value}$"):
            evaluate_folder(tinycd, root, device="cpu")
    # Said to mark unlabelled pixels, it does: nothing here is labelled change.
    said = evaluate_folder(tinycd, tmp_path / "change255", device="cpu", ignore_value=255)["confusion"]
    assert said["tp"] == said["fn"] == 0 and sum(said.values()) == np.count_nonzero(change == 0)

    # Beside a label that marks change with 255 (and declares no nodata), it is the dataset's change value.
    root = dataset(tmp_path / "mixed", levir_pair, {"a": change, "b": change}, 255)
    write_image(root / "label" / "a.tif", change[None])
    with pytest.raises(RasterError, match=r"label/b\.tif: its nodata value is 255, the value .*label/a\.tif marks "
                                          r"change with: "):
        evaluate_folder(tinycd, root, device="cpu")


def test_cli_evaluate_leaves_out_a_label_s_nodata(levir_pair, tinycd_package, tmp_path):
    labels = (levir_pair[2] > 0).astype(np.uint8)
    labels[:, :50] = 255
    root = dataset(tmp_path / "sparse", levir_pair, {"x": labels}, 255)
    done = subprocess.run([*GEOCHANGE, "evaluate", "--model", str(tinycd_package), "--data", str(root),
                           "--device", "cpu", "--json", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sum(json.loads((tmp_path / "m.json").read_text())["confusion"].values()) == 128 * 78
