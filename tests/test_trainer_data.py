"""Trainer data on the shared real data: folder datasets and their splits, raster pairs cut into chips
(label raster or polygons), the seeded stream, and the augmentations of methods.md."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from geochange.trainer.augment import Augment
from geochange.trainer.config import SCHEMA, deep_merge, validate
from geochange.trainer.data import (IGNORE, DataError, RasterSource, StreamSampler, TrainStream, build_splits,
                                    dataset_spec_errors, train_loader, worker_error)
from geochange.engine.errors import RasterError
from geochange.engine.inputs import normalise, optical_input, sar_input
from geochange.engine.routing import change_area_ratio

OPTICAL = {"pre": optical_input(3), "post": optical_input(3)}


def augment_config(**sections) -> dict:
    """The default augment section with ``sections`` merged over it, crops of any size among them (a config
    refuses crops too small to be a package's tile; the augmentations take any)."""
    raw = {"name": "a", "model": {"architecture": "tinycd"}, "data": {"datasets": [{"root": "x"}]}}
    return deep_merge(validate(raw)["augment"], sections)


def ids(items):
    return [i.id for i in items]


def test_ratio_split_is_seeded_disjoint_and_complete(shared_data):
    spec = {"root": str(shared_data / "levir_cd"), "split": {"val": 0.2, "test": 0.2, "seed": 3}}
    first, again = build_splits([spec]), build_splits([spec])
    assert {s: ids(v) for s, v in first.items()} == {s: ids(v) for s, v in again.items()}
    assert [len(first[s]) for s in ("train", "val", "test")] == [7, 2, 2]
    every = ids(first["train"]) + ids(first["val"]) + ids(first["test"])
    assert len(set(every)) == 11
    other = build_splits([{**spec, "split": {"val": 0.2, "test": 0.2, "seed": 4}}])
    assert ids(other["val"]) != ids(first["val"]) or ids(other["test"]) != ids(first["test"])
    # A share asked for that rounds to no pair: the run would have gone on without validation, silently.
    with pytest.raises(DataError, match=r"levir_cd: split.val 0.01 of 11 pairs is none; give a larger share"):
        build_splits([{**spec, "split": {"val": 0.01}}])


def test_named_split_list_files_and_split_folders(shared_data, tmp_path):
    levir = shared_data / "levir_cd"
    names = sorted(p.name for p in (levir / "A").iterdir())
    named = build_splits([{"root": str(levir), "name": "levir", "split": {"train": names[:3], "val": [names[3]]}}])
    assert ids(named["train"]) == [f"levir/{n}" for n in names[:3]] and not named["test"]
    with pytest.raises(DataError, match="not in the dataset"):
        build_splits([{"root": str(levir), "split": {"train": ["missing.png"]}}])
    # List files beside a copy of the dataset (symlinked images).
    root = tmp_path / "listed"
    for folder in ("A", "B", "label"):
        (root / folder).mkdir(parents=True)
        for n in names[:4]:
            (root / folder / n).symlink_to(levir / folder / n)
    (root / "train.txt").write_text("\n".join(f"A/{n}" for n in names[:3]) + "\n\n")
    (root / "test.txt").write_text(names[3])
    listed = build_splits([{"root": str(root), "lists": {"train": "train.txt", "test": "test.txt"}}])
    assert [len(listed[s]) for s in ("train", "val", "test")] == [3, 0, 1]
    # Lists of val and test only are names too, not ratios (a dataset that trains nothing).
    (root / "val.txt").write_text(names[0])
    listed = build_splits([{"root": str(root), "lists": {"val": "val.txt", "test": "test.txt"}}])
    assert [len(listed[s]) for s in ("train", "val", "test")] == [0, 1, 1]
    # {train,val}/{A,B,label} subfolders are found without a split spec.
    for split, chosen in (("train", names[:2]), ("val", names[2:3])):
        for folder in ("A", "B", "label"):
            (tmp_path / "splits" / split / folder).mkdir(parents=True)
            for n in chosen:
                (tmp_path / "splits" / split / folder / n).symlink_to(levir / folder / n)
    layout = build_splits([{"root": str(tmp_path / "splits")}])
    assert [len(layout[s]) for s in ("train", "val", "test")] == [2, 1, 0]
    with pytest.raises(DataError, match="give split or lists"):
        build_splits([{"root": str(levir)}])


def test_a_validation_split_carved_out_of_train_folders(shared_data):
    """OMBRIA has train/ and test/ only: about 10 % of train/ becomes val/, seeded; test/ stays whole."""
    spec = {"root": str(shared_data / "ombria_full"), "split": {"val": 0.1, "seed": 0}}
    splits = build_splits([spec])
    assert [len(splits[s]) for s in ("train", "val", "test")] == [562, 62, 70]
    assert not set(ids(splits["train"])) & set(ids(splits["val"]))
    assert ids(build_splits([spec])["val"]) == ids(splits["val"])
    assert ids(build_splits([{**spec, "split": {"val": 0.1, "seed": 1}}])["val"]) != ids(splits["val"])
    with pytest.raises(DataError, match="can only carve val"):
        build_splits([{**spec, "split": {"val": 0.1, "test": 0.1}}])


def test_folder_pairs_load_as_raw_dates_and_binary_labels(shared_data):
    split = build_splits([{"root": str(shared_data / "ombria"), "split": {"val": 0.5}}])
    pre, post, label = split["train"][0].load()
    assert pre.shape == (3, 256, 256) and post.shape == (1, 256, 256)  # optical before, SAR grey after
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
    assert 0 < label.mean() < 1  # some change
    # Decoded once and kept: a later read gives the same pixels, whatever the first reader did to its copy.
    pre[:] = 0
    again = split["train"][0].load()
    assert again[0].any() and all(np.array_equal(a, b) for a, b in zip(again[1:], (post, label)))
    assert split["train"][0].source._decoded_bytes == sum(a.nbytes for a in again)


def _polygon_file(path, source: RasterSource, rows, cols):
    """A GeoPackage with one rectangle covering pixel ``rows`` x ``cols`` of the raster."""
    from osgeo import ogr, osr

    t = source.transform
    (x0, y0), (x1, y1) = t * (cols[0], rows[0]), t * (cols[1], rows[1])
    ring = ogr.Geometry(ogr.wkbLinearRing)
    for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)):
        ring.AddPoint_2D(x, y)
    polygon = ogr.Geometry(ogr.wkbPolygon)
    polygon.AddGeometry(ring)
    srs = osr.SpatialReference()
    srs.ImportFromWkt(source.crs.to_wkt())
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
    layer = ds.CreateLayer("changes", srs, ogr.wkbPolygon)
    feature = ogr.Feature(layer.GetLayerDefn())
    feature.SetGeometry(polygon)
    layer.CreateFeature(feature)
    ds = None


def test_raster_pair_chips_with_label_raster_or_polygons(shared_data, tmp_path):
    tile = shared_data / "levir_tile_georef"
    spec = {"pre": str(tile / "pre.tif"), "post": str(tile / "post.tif"), "label": str(tile / "label.tif"),
            "chip": 256, "split": {"val": 0.25, "test": 0.25, "seed": 0}}
    split = build_splits([spec])
    assert [len(split[s]) for s in ("train", "val", "test")] == [8, 4, 4]
    item = split["val"][0]
    pre, post, label = item.load()
    assert pre.shape == post.shape == (3, 256, 256) and label.shape == (256, 256)
    source = item.source
    polygons = tmp_path / "labels.gpkg"
    _polygon_file(polygons, source, rows=(10, 50), cols=(20, 80))
    burnt = build_splits([{**spec, "label": str(polygons)}])
    first = next(i for i in burnt["train"] + burnt["val"] + burnt["test"] if i.key.startswith("r0_c0_"))
    label = first.load()[2]
    assert label[10:50, 20:80].all() and label.sum() == 40 * 60
    # Random training chips never overlap a held-out chip.
    randomly = build_splits([{**spec, "sampler": "random", "samples": 12}])
    assert len(randomly["train"]) == 12
    held = [RasterSource.window(i.key) for i in randomly["val"] + randomly["test"]]
    for item in randomly["train"]:
        w = RasterSource.window(item.key)
        assert not any(w.row_off < h.row_off + h.height and h.row_off < w.row_off + w.height and
                       w.col_off < h.col_off + h.width and h.col_off < w.col_off + w.width for h in held)


def test_augmentation_moves_dates_and_label_together_and_pads_with_ignore():
    rng = np.random.default_rng(0)
    label = (rng.random((96, 96)) < 0.3).astype(np.uint8)
    pre = np.repeat(label[None] * 200, 3, 0).astype(np.uint8)
    geometry_only = augment_config(photometric={"prob": 0.0}, rot_flip=1.0, crop={"size": 64, "cat_max_ratio": 1.0})
    for seed in range(8):
        a, b, lab = Augment(geometry_only)(pre, pre.copy(), label, OPTICAL, np.random.default_rng(seed))
        assert a.shape == (3, 64, 64) and lab.shape == (64, 64)
        np.testing.assert_array_equal(a, b)
        valid = lab != IGNORE
        if (lab == IGNORE).any():  # rotated: padding is 0 in the images (bilinear at its edge), ignored
            assert (a[:, ~valid] == 0).mean() > 0.8
        inner = valid.copy()
        inner[[0, -1], :] = inner[:, [0, -1]] = False  # bilinear edges of a rotation
        sharp = inner & ((a[0] < 5) | (a[0] > 195))
        np.testing.assert_array_equal(a[0][sharp] > 100, lab[sharp] == 1)
    rotated = Augment(augment_config(rotate={"prob": 1.0, "degrees": 30}, photometric={"prob": 0.0},
                                     crop={"size": 96}))(pre, pre, label, OPTICAL, np.random.default_rng(1))[2]
    assert (rotated == IGNORE).any()


def test_crop_avoids_single_class_crops_and_pads_small_images():
    label = np.zeros((256, 256), np.uint8)
    label[:40, :40] = 1
    image = np.zeros((3, 256, 256), np.uint8)
    cfg = augment_config(rotate={"prob": 0.0}, flip={"horizontal": 0.0, "vertical": 0.0}, photometric={"prob": 0.0},
                         crop={"size": 64, "cat_max_ratio": 0.75})
    mixed = sum(len(np.unique(Augment(cfg)(image, image, label, OPTICAL, np.random.default_rng(s))[2])) > 1
                for s in range(20))
    plain = augment_config(**{**cfg, "crop": {"size": 64, "cat_max_ratio": 1.0}})
    mixed_plain = sum(len(np.unique(Augment(plain)(image, image, label, OPTICAL, np.random.default_rng(s))[2])) > 1
                      for s in range(20))
    assert mixed > mixed_plain
    small = Augment(augment_config(**{**cfg, "crop": {"size": 64}}))(image[:, :40, :50], image[:, :40, :50],
                                                                     label[:40, :50], OPTICAL, np.random.default_rng(0))
    assert small[0].shape == (3, 64, 64) and (small[2][40:] == IGNORE).all() and (small[2][:, 50:] == IGNORE).all()


def test_photometric_distortion_is_per_date_and_exchange_swaps():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 32, 32)).astype(np.uint8)
    label = np.zeros((32, 32), np.uint8)
    photo = augment_config(rotate={"prob": 0.0}, flip={"horizontal": 0.0, "vertical": 0.0}, crop={"size": 32},
                           photometric={"prob": 1.0})
    a, b, _ = Augment(photo)(image, image, label, OPTICAL, np.random.default_rng(0))
    assert not np.allclose(a, b) and not np.allclose(a, image)
    assert a.min() >= 0 and a.max() <= 255
    # A one-band SAR date gets brightness and contrast only; it stays one band.
    sar = {"pre": optical_input(3), "post": sar_input(3)}
    _, grey, _ = Augment(photo)(image, image[:1], label, sar, np.random.default_rng(0))
    assert grey.shape == (1, 32, 32)
    swap = augment_config(rotate={"prob": 0.0}, flip={"horizontal": 0.0, "vertical": 0.0}, crop={"size": 32},
                          photometric={"prob": 0.0}, exchange=1.0)
    a, b, _ = Augment(swap)(image, image[::-1], label, OPTICAL, np.random.default_rng(0))
    np.testing.assert_array_equal(a, image[::-1])


def test_tinycd_augmentation_as_albumentations_does_it():
    """TinyCD's authors' pipeline: Flip, Rotate with reflected edges, brightness-contrast and blur per date."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 32, 32)).astype(np.uint8)
    label = (rng.random((32, 32)) < 0.3).astype(np.uint8)
    still = {"rotate": {"prob": 0.0}, "flip": {"horizontal": 0.0, "vertical": 0.0}, "crop": {"size": 32},
             "photometric": {"prob": 0.0}}
    flips = augment_config(**{**still, "flip": {"horizontal": 0.0, "vertical": 0.0, "any": 1.0}})
    seen = set()
    for seed in range(30):
        a, b, lab = Augment(flips)(image, image, label, OPTICAL, np.random.default_rng(seed))
        axes = next(axes for axes in ((-2,), (-1,), (-2, -1)) if np.array_equal(lab, np.flip(label, axes)))
        np.testing.assert_array_equal(a, np.flip(image, axes))
        seen.add(axes)
    assert len(seen) == 3
    reflected = augment_config(**{**still, "rotate": {"prob": 1.0, "degrees": 30, "padding": "reflect"}})
    a, _, lab = Augment(reflected)(image, image, label, OPTICAL, np.random.default_rng(1))
    assert not (lab == IGNORE).any() and set(np.unique(lab)) == {0, 1} and (a[:, :3, :3] > 0).any()
    # Brightness and contrast: one affine map of each date, not clipped (TinyCD's images are floats).
    changed = augment_config(**still, brightness_contrast={"prob": 1.0, "brightness": 0.2, "contrast": 0.2})
    a, b, _ = Augment(changed)(image, image, label, OPTICAL, np.random.default_rng(2))
    for out in (a, b):
        alpha, beta = np.polyfit(image.ravel().astype(float), out.ravel(), 1)
        assert 0.8 <= alpha <= 1.2 and -0.2 * 255 <= beta <= 0.2 * 255
        np.testing.assert_allclose(out, alpha * image + beta, atol=1e-3)
    assert not np.allclose(a, b)
    # Blur: OpenCV's 1-2-1 kernel for sigma 0, its edges reflected without repeating the edge pixel.
    impulse = np.zeros((3, 32, 32), np.uint8)
    impulse[:, 0, 0] = impulse[:, 10, 10] = 160
    blurred = augment_config(**still, blur={"prob": 1.0, "kernels": [3]})
    a, _, _ = Augment(blurred)(impulse, impulse, label, OPTICAL, np.random.default_rng(0))
    np.testing.assert_allclose(a[0, 9:12, 9:12], 160 * np.outer([1, 2, 1], [1, 2, 1]) / 16)
    np.testing.assert_allclose(a[0, :2, :2], 160 * np.array([[0.25, 0.125], [0.125, 0.0625]]))
    assert a.sum() == pytest.approx(3 * (160 + 160 * 0.5625))


def test_stream_is_seeded_by_position_and_split_over_processes(shared_data):
    split = build_splits([{"root": str(shared_data / "dsifn"), "split": {"val": 0.2}}])
    cfg = augment_config(crop={"size": 64})
    stream = TrainStream(split["train"], Augment(cfg), OPTICAL, seed=5)
    first, again = stream[11], stream[11]
    for key in ("pre", "post", "label"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(stream[11]["pre"], stream[12]["pre"])
    # Each epoch visits every item once, in a seeded order.
    n = len(split["train"])
    assert sorted(stream.item_at(k).id for k in range(n, 2 * n)) == sorted(ids(split["train"]))
    assert TrainStream(split["train"], Augment(cfg), OPTICAL, seed=5).item_at(3) == stream.item_at(3)
    # Two processes take the two halves of every global batch of one process.
    def take(sampler, count):
        out, it = [], iter(sampler)
        for _ in range(count):
            out.append(next(it))
        return out
    single = take(StreamSampler(7, 4), 8)
    halves = [take(StreamSampler(7, 4, rank, 2), 4) for rank in (0, 1)]
    assert single == [*halves[0][:2], *halves[1][:2], *halves[0][2:], *halves[1][2:]] == list(range(28, 36))
    with pytest.raises(DataError, match="not divisible"):
        StreamSampler(0, 3, 0, 2)


def test_a_label_s_change_area_ratio_leaves_ignored_pixels_out():
    label = np.zeros((2, 10, 10), np.uint8)
    label[0, :5] = 1
    label[1, :2] = 1
    label[1, 5:] = IGNORE
    assert change_area_ratio(label == 1, label != IGNORE).tolist() == [0.5, 0.4]
    assert "datasets" in SCHEMA["data"]


def _write_raster(path, data, nodata=None):
    import rasterio
    from affine import Affine

    with rasterio.open(path, "w", driver="GTiff", width=data.shape[-1], height=data.shape[-2], count=data.shape[0],
                       dtype=data.dtype, crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 5000000),
                       nodata=nodata) as dst:
        dst.write(data)
    return str(path)


def test_nodata_and_nan_in_a_raster_pair_are_pixels_no_loss_sees(tmp_path):
    """A date's nodata value or NaN: the label ignores the pixel, and the model's input holds no NaN there."""
    pre = np.full((3, 64, 64), 100, np.uint8)
    pre[:, :8] = 0  # the nodata value
    post = np.full((1, 64, 64), 0.5, np.float32)
    post[:, :, :4] = np.nan
    spec = {"pre": _write_raster(tmp_path / "pre.tif", pre, nodata=0),
            "post": _write_raster(tmp_path / "post.tif", post),
            "label": _write_raster(tmp_path / "label.tif", np.ones((1, 64, 64), np.uint8)),
            "chip": 64, "split": {"val": 0.0}}
    [item] = build_splits([spec])["train"]
    pre_chip, post_chip, label = item.load()
    ignored = np.zeros((64, 64), bool)
    ignored[:8] = True
    ignored[:, :4] = True
    assert np.array_equal(label == IGNORE, ignored) and (label[~ignored] == 1).all()
    assert np.isfinite(post_chip).all() and (post_chip[:, ~ignored] == 0.5).all() and post_chip.dtype == np.float32


@pytest.mark.parametrize("cached", [True, False])
def test_nan_in_a_folder_dataset_s_float_tile_is_a_pixel_no_loss_sees(tmp_path, monkeypatch, cached):
    """Float SAR tiles (Sen1Floods11's dB) mark nodata with NaN: ignored by the loss and the metrics, and zeroed,
    whether the decoded tiles are kept in memory or, past its budget, decoded at each read."""
    from geochange.trainer import data

    monkeypatch.setattr(data, "DECODED_BYTES", data.DECODED_BYTES if cached else 0)
    sar = np.full((1, 64, 64), -12.0, np.float32)
    sar[0, :8] = np.nan
    for folder, image in (("A", np.full((3, 64, 64), 100, np.uint8)), ("B", sar),
                          ("label", np.ones((1, 64, 64), np.uint8))):
        (tmp_path / folder).mkdir()
        _write_raster(tmp_path / folder / "tile.tif", image)
    [item] = build_splits([{"root": str(tmp_path), "split": {"val": 0.0}}])["train"]
    for _ in range(2):  # decoded, then (where kept) from memory
        pre, post, label = item.load()
        assert (label[:8] == IGNORE).all() and (label[8:] == 1).all()
        assert np.isfinite(post).all() and (post[0, :8] == 0).all() and (post[0, 8:] == -12).all()
    _write_raster(tmp_path / "B" / "tile.tif", sar[:, :32])  # a tile of another size: named, not a numpy error
    [item] = build_splits([{"root": str(tmp_path), "split": {"val": 0.0}}])["train"]
    with pytest.raises(RasterError, match=r"B/tile.tif is 64x32 px but .*A/tile.tif is 64x64 px; a pair and its"):
        item.load()


@pytest.mark.parametrize("nodata, dtype", [(255, np.uint8), (-1, np.int16)])
def test_a_folder_label_s_nodata_is_a_pixel_no_loss_sees(tmp_path, nodata, dtype):
    """A GeoTIFF label's own nodata was a label value: 255 beside 0/1 and -1 refused without ignore_value, 255 in a
    tile without a 1 trained as change. Its pixels are IGNORE, as ignore_value's; a nodata that is a class value is
    refused, naming the dataset's key."""
    change = np.zeros((1, 64, 64), dtype)
    change[0, 32:] = 1
    labels = {"t0.tif": change.copy(), "t1.tif": np.zeros_like(change)}  # t1: a tile without a 1
    for label in labels.values():
        label[0, :, :8] = nodata
    for folder in ("A", "B", "label"):
        (tmp_path / folder).mkdir()
    for name, label in labels.items():
        for date in ("A", "B"):
            _write_raster(tmp_path / date / name, np.full((3, 64, 64), 100, np.uint8))
        _write_raster(tmp_path / "label" / name, label, nodata)
    spec = {"root": str(tmp_path), "split": {"val": 0.0}}
    items = build_splits([spec])["train"]
    for item, expected in zip(items, (change[0], np.zeros((64, 64), dtype))):
        label = item.load()[2]
        assert (label[:, :8] == IGNORE).all() and np.array_equal(label[:, 8:], expected[:, 8:]), item.id

    plain = {"t0.tif": change, "t1.tif": np.zeros_like(change)}
    for name, label in plain.items():  # a nodata of 0 (the image's profile): no change, as if not declared
        _write_raster(tmp_path / "label" / name, label, 0)
    for item, label in zip(build_splits([spec])["train"], plain.values()):
        assert np.array_equal(item.load()[2], label[0]), item.id
    _write_raster(tmp_path / "label" / "t0.tif", change, 1)  # the change value of this 0/1 label
    with pytest.raises(RasterError, match=r"t0\.tif: its nodata value is 1, and no other pixel .* ignore_value: 1$"):
        build_splits([spec])


def test_chips_below_the_models_smallest_tile_are_refused_by_the_config_check():
    chip = {"pre": "a.tif", "post": "b.tif", "label": "c.tif", "chip": 16, "split": {"val": 0.1}}
    assert "chip: must be at least 32 px, the smallest tile the models take" in dataset_spec_errors(chip)


def test_training_data_of_another_type_than_its_spec_is_refused_in_one_line(tmp_path):
    """Trained dividing uint16 by the spec's 255, the model would be given uint16 divided by 10000 when it runs."""
    label = _write_raster(tmp_path / "label.tif", np.ones((1, 64, 64), np.uint8))
    wide = _write_raster(tmp_path / "pre16.tif", np.full((3, 64, 64), 900, np.uint16))
    spec = {"pre": wide, "post": wide, "label": label, "chip": 64, "split": {"val": 0.0}}
    stream = TrainStream(build_splits([spec])["train"], Augment(augment_config(crop={"size": 64})), OPTICAL, seed=0)
    message = "pre16/r0_c0_h64_w64: the pre image is uint16, but data.inputs.pre says uint8 (scale 255); set its " \
              "dtype and scale to the data's"
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        stream[0]
    # Raised in a loader's worker, torch wraps it in the worker's traceback; the trainer gives its own line back.
    with pytest.raises(DataError) as wrapped:
        next(iter(train_loader(stream, 0, 1, workers=1)))
    assert "Original Traceback" in str(wrapped.value) and str(worker_error(wrapped.value)) == message


@pytest.mark.parametrize("sar_db, value", [(True, -12.0), (False, 0.05)])  # dB, and linear power (-13 dB)
def test_float_sar_trains_as_the_engine_reads_it(tmp_path, sar_db, value):
    """Float SAR backscatter is mapped from the spec's dB window, read as dB or linear power as data.sar_db says,
    whatever the spec's type: the model's input is the one detect gives it with --sar-db or without."""
    label = _write_raster(tmp_path / "label.tif", np.ones((1, 64, 64), np.uint8))
    optical = _write_raster(tmp_path / "pre.tif", np.full((3, 64, 64), 100, np.uint8))
    sar = _write_raster(tmp_path / "sar.tif", np.full((1, 64, 64), value, np.float32))
    spec = {"pre": optical, "post": sar, "label": label, "chip": 64, "split": {"val": 0.0}}
    inputs = {"pre": optical_input(3), "post": sar_input(3)}  # trained on 8-bit SAR images by default
    augment = Augment(augment_config(crop={"size": 64}))
    engine = normalise(torch.full((1, 1, 64, 64), value), inputs["post"], sar_db=sar_db)[0]
    chip = TrainStream(build_splits([spec])["train"], augment, inputs, seed=0, sar_db=sar_db)[0]["post"]
    assert torch.allclose(chip[:, 32, 32], engine[:, 32, 32], atol=1e-5)
    other = TrainStream(build_splits([spec])["train"], augment, inputs, seed=0, sar_db=not sar_db)
    if sar_db:  # dB read as power: refused, not trained on a blank date
        with pytest.raises(RasterError, match="the post image holds backscatter in dB, not linear power"):
            other[0]
    else:
        assert not torch.allclose(other[0]["post"][:, 32, 32], engine[:, 32, 32], atol=1e-5)


def test_an_ombria_tile_in_db_trains_and_validates_as_its_8_bit_image(shared_data, tmp_path):
    """OMBRIA's 8-bit SAR is backscatter mapped from -25..0 dB: the same tile stored as float dB gives the model the
    same input in training and in the trainer's validation (the engine's predictor, told data.sar_db)."""
    from geochange.engine.evaluate import predict_image
    from geochange.engine.manifest import make_manifest
    from geochange.engine.models import create
    from geochange.engine.rasters import read_image
    from geochange.trainer.evaluation import predictor_for

    tile = {d: shared_data / "ombria" / d / "test_0013.png" for d in ("A", "B", "label")}
    optical, sar, label = (read_image(path) for path in tile.values())
    paths = {"pre": _write_raster(tmp_path / "pre.tif", optical), "label": _write_raster(tmp_path / "label.tif", label),
             "8 bit": _write_raster(tmp_path / "sar8.tif", sar),
             "dB": _write_raster(tmp_path / "sar_db.tif", (sar / 255.0 * 25.0 - 25.0).astype(np.float32))}
    inputs = {"pre": optical_input(3), "post": sar_input(3)}
    augment = Augment(augment_config(crop={"size": 128}))
    chips, items = {}, {}
    for kind in ("8 bit", "dB"):
        spec = {"pre": paths["pre"], "post": paths[kind], "label": paths["label"], "chip": 256, "split": {"val": 0.0}}
        items[kind] = build_splits([spec])["train"]
        stream = TrainStream(items[kind], augment, inputs, seed=0, sar_db=True)
        chips[kind] = [stream[k]["post"] for k in range(3)]
    for eight_bit, db in zip(chips["8 bit"], chips["dB"]):
        assert torch.allclose(eight_bit, db, atol=1e-5)
    manifest = make_manifest("m2cd_mit_b0")
    predictor = predictor_for(create("m2cd_mit_b0").eval(), manifest, "cpu", sar_db=True)
    probability = {kind: predict_image(predictor, *items[kind][0].load()[:2]) for kind in ("8 bit", "dB")}
    assert np.abs(probability["8 bit"] - probability["dB"]).max() < 1e-4


def test_grid_chips_of_one_split_share_no_pixel_with_another_s(shared_data):
    """Chips of 256 px every 128 px overlap their neighbours by half: held-out chips take their pixels alone."""
    tile = shared_data / "levir_tile_georef"
    spec = {"pre": str(tile / "pre.tif"), "post": str(tile / "post.tif"), "label": str(tile / "label.tif"),
            "chip": 256, "stride": 128, "split": {"val": 0.1, "test": 0.1, "seed": 0}}
    split = build_splits([spec])
    windows = {s: [RasterSource.window(i.key) for i in split[s]] for s in ("train", "val", "test")}
    assert all(windows.values())

    def meet(a, b):
        return (a.row_off < b.row_off + b.height and b.row_off < a.row_off + a.height and
                a.col_off < b.col_off + b.width and b.col_off < a.col_off + a.width)

    for first, second in (("train", "val"), ("train", "test"), ("test", "val")):
        assert not any(meet(a, b) for a in windows[first] for b in windows[second])
    assert len(windows["train"]) < 49 - len(windows["val"]) - len(windows["test"])  # 7 x 7 chips, some dropped
    with pytest.raises(DataError, match="train chips shares pixels with a chip held out for val or test \\(chip 256, "
                                        "stride 16\\)"):
        build_splits([{**spec, "stride": 16, "split": {"val": 0.3, "test": 0.3, "seed": 0}}])


def test_band_numbers_past_a_raster_s_bands_and_lists_beside_split_folders_are_refused(tmp_path):
    pair = {date: _write_raster(tmp_path / f"{date}.tif", np.ones((3, 64, 64), np.uint8)) for date in ("pre", "post")}
    label = _write_raster(tmp_path / "label.tif", np.ones((1, 64, 64), np.uint8))
    with pytest.raises(DataError, match=r"^pre: bands.post names band 4, but .*post.tif has 3$"):
        build_splits([{**pair, "label": label, "chip": 64, "split": {"val": 0.0}, "bands": {"post": [1, 4]}}])
    # The split folders are the splits; lists naming others were ignored without a word.
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="has train/ val/ test/ subfolders, which are its splits; lists are for"):
        build_splits([{"root": str(tmp_path), "lists": {"train": "train.txt"}}])


class _DecodedBytes(torch.utils.data.Dataset):
    """The bytes a process keeps decoded once it has read item ``i``."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.items[i].load()
        return self.items[i].source._decoded_bytes


def test_loader_workers_share_the_decoded_tiles_budget(tmp_path, monkeypatch):
    """Each worker keeps its own copy of a source's decoded tiles: two workers get half the budget each."""
    from geochange.trainer import data

    for folder, bands in (("A", 3), ("B", 3), ("label", 1)):
        (tmp_path / folder).mkdir()
        for name in ("t1.tif", "t2.tif"):
            _write_raster(tmp_path / folder / name, np.ones((bands, 64, 64), np.uint8))
    pair = 7 * 64 * 64
    monkeypatch.setattr(data, "DECODED_BYTES", pair * 3 // 2)
    for workers, kept in ((0, [pair, pair]), (2, [0, 0])):
        items = build_splits([{"root": str(tmp_path), "split": {"val": 0.0}}])["train"]
        assert list(torch.utils.data.DataLoader(_DecodedBytes(items), batch_size=None, num_workers=workers)) == kept


def test_datasets_of_one_name_are_refused_as_their_items_would_share_ids(tmp_path):
    """Items are known by <dataset name>/<key> (MTKD's teachers pick their chips so): two pairs whose pre rasters are
    both A.tif would have mixed their chips up."""
    specs = []
    for site in ("north", "south"):
        (tmp_path / site).mkdir()
        pair = {date: _write_raster(tmp_path / site / f"{name}.tif", np.ones((bands, 64, 64), np.uint8))
                for date, name, bands in (("pre", "A", 3), ("post", "B", 3), ("label", "label", 1))}
        specs.append({**pair, "chip": 64, "split": {"val": 0.0}})
    message = (f"data.datasets.0 ({tmp_path}/north/A.tif) and data.datasets.1 ({tmp_path}/south/A.tif) are both "
               "named 'A', so their items would share ids; give each a name:")
    with pytest.raises(DataError, match=f"^{re.escape(message)}$"):
        build_splits(specs)
    named = build_splits([{**spec, "name": site} for spec, site in zip(specs, ("north", "south"))])
    assert ids(named["train"]) == ["north/r0_c0_h64_w64", "south/r0_c0_h64_w64"]


def test_a_folder_dataset_s_pair_in_two_splits_or_listed_twice_is_refused(tmp_path):
    for folder, bands in (("A", 3), ("B", 3), ("label", 1)):
        (tmp_path / folder).mkdir()
        for name in ("t0.tif", "t1.tif"):
            _write_raster(tmp_path / folder / name, np.ones((bands, 64, 64), np.uint8))
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path))}: t1.tif is listed in both split.train and "
                                        "split.val; each pair belongs to one split, once$"):
        build_splits([{"root": str(tmp_path), "split": {"train": ["t0.tif", "t1.tif"], "val": ["t1.tif"],
                                                         "test": ["t1.tif"]}}])
    (tmp_path / "train.txt").write_text("t0.tif\nA/t0.tif\n")
    (tmp_path / "val.txt").write_text("t1.tif\n")
    with pytest.raises(DataError, match="t0.tif is listed twice in lists.train; each pair belongs to one split, once"):
        build_splits([{"root": str(tmp_path), "lists": {"train": "train.txt", "val": "val.txt"}}])
    (tmp_path / "train.txt").write_text("t0.tif\nt1.tif\n")
    with pytest.raises(DataError, match="t1.tif is listed in both lists.train and lists.val"):
        build_splits([{"root": str(tmp_path), "lists": {"train": "train.txt", "val": "val.txt"}}])


@pytest.mark.parametrize("dtype, scale, values", [("uint16", 10000.0, [500, 9000, 15000, 30000]),
                                                  ("float32", 1.0, [-0.2, 0.05, 0.9, 1.5])])
def test_photometric_distortion_clips_to_the_data_s_type_not_to_its_scale(dtype, scale, values):
    """Reflectance past 1.0 (uint16 past its scale of 10000, float past 1) and float below 0 is data: a photometric
    step that changes nothing leaves it; uint8 is clipped to 0-255 as mmseg does."""
    image = np.broadcast_to(np.array(values, dtype).reshape(1, 2, 2), (3, 2, 2)).copy()
    identity = augment_config(rotate={"prob": 0.0}, flip={"horizontal": 0.0, "vertical": 0.0}, crop={"size": 2},
                              photometric={"prob": 1.0, "brightness": 0, "contrast": [1.0, 1.0],
                                           "saturation": [1.0, 1.0], "hue": 0})
    spec = {date: optical_input(3, scale, dtype) for date in ("pre", "post")}
    a, b, _ = Augment(identity)(image, image, np.zeros((2, 2), np.uint8), spec, np.random.default_rng(0))
    np.testing.assert_allclose(a, image, rtol=1e-5, atol=1e-6)
    brighter = augment_config(**{**identity, "photometric": {**identity["photometric"], "brightness": 40}})
    eight_bit = np.full((3, 2, 2), 250, np.uint8)
    brightest = [Augment(brighter)(eight_bit, eight_bit, np.zeros((2, 2), np.uint8), OPTICAL,
                                   np.random.default_rng(seed))[0].max() for seed in range(8)]
    assert max(brightest) == 255


def test_hue_shift_draws_as_mmseg_does():
    """mmseg's hue shift is ``randint(-hue, hue)``: ``hue`` itself is never drawn (with hue 1: -1 or 0 steps of
    OpenCV's 180 a turn)."""
    from skimage.color import rgb2hsv

    red = np.zeros((3, 2, 2), np.uint8)
    red[0] = 200
    cfg = augment_config(rotate={"prob": 0.0}, flip={"horizontal": 0.0, "vertical": 0.0}, crop={"size": 2},
                         photometric={"prob": 1.0, "brightness": 0, "contrast": [1.0, 1.0],
                                      "saturation": [1.0, 1.0], "hue": 1})
    steps = set()
    for seed in range(40):
        a, _, _ = Augment(cfg)(red, red, np.zeros((2, 2), np.uint8), OPTICAL, np.random.default_rng(seed))
        hue = rgb2hsv(np.moveaxis(a / 255.0, 0, -1))[0, 0, 0]
        steps.add(round(((hue + 0.5) % 1 - 0.5) * 180))
    assert steps == {-1, 0}


def test_a_raster_pair_cut_short_after_its_header_names_the_file_and_the_chip(tmp_path):
    """A tiled, compressed GeoTIFF truncated past its header opens, and failed at the chip's read with rasterio's
    raw error (three tracebacks with loader workers); a folder dataset's says the file is corrupt."""
    import rasterio

    pre = np.random.default_rng(0).integers(0, 255, (3, 128, 128), dtype=np.uint8)  # noise: tiles compress little
    whole = _write_raster(tmp_path / "whole.tif", pre)
    with rasterio.open(whole) as src:
        profile = src.profile | {"tiled": True, "blockxsize": 64, "blockysize": 64, "compress": "deflate"}
    with rasterio.open(tmp_path / "tiled.tif", "w", **profile) as dst:
        dst.write(pre)
    data = (tmp_path / "tiled.tif").read_bytes()
    (tmp_path / "pre.tif").write_bytes(data[:len(data) // 2])
    spec = {"pre": str(tmp_path / "pre.tif"), "post": whole,
            "label": _write_raster(tmp_path / "label.tif", np.ones((1, 128, 128), np.uint8)),
            "chip": 64, "split": {"val": 0.0}}
    last = {item.key: item for item in build_splits([spec])["train"]}["r64_c64_h64_w64"]
    with pytest.raises(RasterError, match=re.escape(f"{tmp_path / 'pre.tif'} (r64_c64_h64_w64): cannot read pixels, "
                                                    "the file is corrupt (")):
        last.load()


@pytest.mark.parametrize("nodata", [None, 255])
def test_training_chips_without_a_labelled_pixel_are_refused_when_the_splits_are_built(tmp_path, nodata):
    """Every training chip's label pixel the ignore value (or the label's nodata): the run trained on nothing, a
    loss of 0, and wrote a package."""
    label = np.full((1, 128, 128), 255, np.uint8)
    label[:, :64, :64] = 0  # labelled only in the chip held out for validation
    label[:, 0, 0] = 1
    spec = {"pre": _write_raster(tmp_path / "pre.tif", np.full((3, 128, 128), 100, np.uint8)),
            "post": _write_raster(tmp_path / "post.tif", np.full((3, 128, 128), 100, np.uint8)),
            "label": _write_raster(tmp_path / "label.tif", label, nodata=nodata), "chip": 64,
            "split": {"train": ["r0_c64_h64_w64", "r64_c0_h64_w64", "r64_c64_h64_w64"], "val": ["r0_c0_h64_w64"]},
            "ignore_value": None if nodata else 255}
    with pytest.raises(DataError, match=r"pre: no pixel of its 3 training chips in .*label.tif is labelled \(all "
                                        r"are 255\)"):
        build_splits([spec])
    label[:, 127, 127] = 1  # one labelled pixel in a training chip is enough
    _write_raster(tmp_path / "label.tif", label, nodata=nodata)
    assert len(build_splits([spec])["train"]) == 3
