"""Datasets for training: where image pairs come from, how they are split, and the seeded sample stream.

A config's ``data.datasets`` lists one or more sources; their splits are concatenated. A source is

* a **folder dataset**: ``root`` with ``A/``, ``B/``, ``label/`` (same file names; labels 0/1 or 0/255).
  Splits come from ``root/{train,val,test}/{A,B,label}`` when ``root/train`` exists (where there is no
  ``val/``, ``split: {val: 0.1, seed: 0}`` carves a seeded validation split out of ``train/``), else from
  ``lists: {train: train.txt, ...}`` (one file name per line, paths relative to ``root``) or from
  ``split``: either names ``{train: [...], val: [...], test: [...]}`` or ratios
  ``{val: 0.2, test: 0.2, seed: 0}`` (a seeded shuffle; the rest is training data);
* a **raster pair**: ``pre``, ``post`` (georeferenced, one grid) and ``label`` (a raster on that grid,
  or vector polygons, burnt in as change), cut into ``chip`` x ``chip`` windows (``stride`` apart) split
  by ``split`` as above; with ``sampler: random`` the training windows are ``samples`` windows at random
  positions that overlap no validation or test chip. ``bands: {pre: [...], post: [...]}`` picks bands.

Optical-SAR pairs are either kind with a one-band post date; the architecture's input spec (or
``data.inputs``) replicates the grey band to the model's channels, as the authors do.
``ignore_value`` marks unlabelled pixels (e.g. 255 in a sparse label) that no loss or metric sees; so does a label
raster's own nodata value (``engine.evaluate.check_change_value`` says when it cannot).
An item's id is ``<name>/<key>`` (``name``: by default the folder's name or the pre raster's file stem), so
datasets with the same name are refused: give each its own ``name``.

Training reads an endless **stream**: position ``k`` is item ``perm_e[k mod n]`` of epoch
``e = k div n`` (a seeded permutation per epoch), augmented with a generator seeded by ``(seed, k)``.
Iteration ``i`` of a run with global batch ``B`` takes positions ``i*B .. i*B+B-1``, each process its
own slice of them, so a resumed or a distributed run sees exactly the samples and augmentations of an
unbroken single-process run.
"""
from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rasterio.errors import RasterioIOError
from rasterio.windows import Window

from geochange.engine.bands import check_band_counts
from geochange.engine.errors import GeoChangeError
from geochange.engine.evaluate import (change_label, check_change_value, check_one_size, dataset_pairs, label_nodata,
                                       read_label)
from geochange.engine.inputs import backscatter_unit_interval, check_backscatter, normalise
from geochange.engine.options import MIN_TILE
from geochange.engine.rasters import (corrupt_pixels, has_mask, open_raster, read_image, valid_mask,
                                      zeroed_where_invalid)
from geochange.engine.remote import refuse_remote
from geochange.engine.windows import WindowPlan

IGNORE = 255  # label value of pixels that no loss or metric sees (unlabelled, rotation padding)
SPLITS = ("train", "val", "test")

_FOLDER_KEYS = {"root", "name", "split", "lists", "ignore_value"}
_RASTER_KEYS = {"pre", "post", "label", "name", "chip", "stride", "split", "sampler", "samples", "bands",
                "ignore_value"}


class DataError(GeoChangeError, ValueError):
    """A dataset that cannot be read or split as configured."""


def _split_spec_errors(split) -> list[str]:
    if not isinstance(split, dict):
        return ["split: must be a mapping"]
    if set(split) <= {"val", "test", "seed"}:
        ratios = [split.get("val", 0), split.get("test", 0)]
        if not all(isinstance(r, (int, float)) and 0 <= r < 1 for r in ratios) or sum(ratios) >= 1:
            return ["split: val and test ratios must be in [0, 1) and sum below 1"]
        return [] if isinstance(split.get("seed", 0), int) else ["split.seed: must be an integer"]
    if set(split) <= set(SPLITS):
        bad = [k for k, v in split.items() if not (isinstance(v, list) and all(isinstance(n, str) for n in v))]
        return [f"split.{k}: must be a list of names" for k in bad]
    return [f"split: either ratios {{val, test, seed}} or names {{train, val, test}}, got keys {sorted(split)}"]


def _bands_spec_errors(bands) -> list[str]:
    """``bands: {pre: [...], post: [...]}``: 1-based band numbers (their count is checked against the rasters')."""
    if not isinstance(bands, dict) or not set(bands) <= {"pre", "post"}:
        return ["bands: must map pre and/or post to lists of band numbers"]
    return [f"bands.{date}: must be a non-empty list of band numbers from 1, got {numbers!r}"
            for date, numbers in bands.items()
            if not (isinstance(numbers, list) and numbers
                    and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in numbers))]


def dataset_spec_errors(spec) -> list[str]:
    """Problems of one ``data.datasets`` entry (structure only; files are checked when it is built)."""
    if not isinstance(spec, dict):
        return ["must be a mapping"]
    if "root" in spec:
        errors = [f"{k}: unknown key for a folder dataset" for k in set(spec) - _FOLDER_KEYS]
        if "split" in spec and "lists" in spec:
            errors.append("split: give either split or lists, not both")
        if "lists" in spec and not (isinstance(spec["lists"], dict) and set(spec["lists"]) <= set(SPLITS)):
            errors.append("lists: must map train/val/test to list files")
    elif {"pre", "post", "label"} <= set(spec):
        errors = [f"{k}: unknown key for a raster dataset" for k in set(spec) - _RASTER_KEYS]
        for key in ("chip", "stride", "samples"):
            if key in spec and not (isinstance(spec[key], int) and spec[key] > 0):
                errors.append(f"{key}: must be a positive integer")
        if isinstance(spec.get("chip"), int) and 0 < spec["chip"] < MIN_TILE:
            errors.append(f"chip: must be at least {MIN_TILE} px, the smallest tile the models take")
        if spec.get("sampler", "grid") not in ("grid", "random"):
            errors.append("sampler: must be grid or random")
        if "split" not in spec:
            errors.append("split: a raster dataset needs a split (ratios or chip names)")
        if "bands" in spec:
            errors += _bands_spec_errors(spec["bands"])
    else:
        return ["a dataset needs root (folder dataset) or pre, post and label (raster pair)"]
    if "split" in spec:
        errors += _split_spec_errors(spec["split"])
    if spec.get("ignore_value") is not None and not isinstance(spec["ignore_value"], (int, float)):
        errors.append("ignore_value: must be a number")
    return errors


def binary_label(raw: np.ndarray, where, ignore_value=None, nodata=None) -> np.ndarray:
    """A label band (0/1 or 0/255, see ``engine.evaluate.change_label``) of ``where``, whose file's nodata value is
    ``nodata`` -> uint8 0/1 with :data:`IGNORE` for unlabelled."""
    change, labelled = change_label(raw, where, ignore_value, "ignore_value:", nodata)
    label = change.astype(np.uint8)
    label[~labelled] = IGNORE
    return label


# --- Sources -------------------------------------------------------------------------------------

# Decoded pairs a folder source keeps in memory: a run reads each tile once an epoch, and decoding PNGs
# again would take the CPU from the model. Past this, pairs are decoded on each read. Each loader worker keeps
# its own copy of the source: they share this budget.
DECODED_BYTES = 2 * 2**30


def _decoded_budget() -> int:
    """This process's share of ``DECODED_BYTES``: all of it outside a loader's workers."""
    worker = torch.utils.data.get_worker_info()
    return DECODED_BYTES // worker.num_workers if worker else DECODED_BYTES


class FolderSource:
    """Pairs of a folder dataset ``A/ B/ label/``, addressed by file name."""

    def __init__(self, name: str, root: Path, ignore_value=None):
        self.name = name
        self.ignore_value = ignore_value
        self.paths = {a.name: (a, b, label) for a, b, label in dataset_pairs(root)}
        check_change_value([label for _, _, label in self.paths.values()], ignore_value, "ignore_value:")
        self._decoded: dict[str, tuple] = {}
        self._decoded_bytes = 0

    def load(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ``(bands, H, W)`` pre and post images and the 0/1/IGNORE label ``(H, W)``, NaN pixels zeroed and
        ignored (``without_invalid``); decoded once and kept while they fit in this process's share of
        ``DECODED_BYTES`` (each read gets its own copy to change)."""
        pair = self._decoded.get(key)
        if pair is None:
            a, b, label = self.paths[key]
            raw, nodata = read_label(label)
            images = (read_image(a), read_image(b), raw)
            check_one_size(*images, self.paths[key])
            pair = (*images[:2], binary_label(raw, label, self.ignore_value, nodata))
            size = sum(array.nbytes for array in pair)
            if self._decoded_bytes + size <= _decoded_budget():
                self._decoded[key], self._decoded_bytes = pair, self._decoded_bytes + size
        pre, post, label = (array.copy() for array in pair) if key in self._decoded else pair
        return without_invalid(pre, post, label, np.isfinite(pre).all(0) & np.isfinite(post).all(0))


class RasterSource:
    """Windows of a georeferenced pair with a label raster or label polygons, addressed as
    ``r<row>_c<col>_h<height>_w<width>``."""

    def __init__(self, name: str, pre: Path, post: Path, label: Path, bands: dict | None = None,
                 ignore_value=None):
        self.name = name
        self.pre, self.post, self.label = pre, post, label
        self.ignore_value = ignore_value
        bands = bands or {}
        with open_raster(pre) as a, open_raster(post) as b:
            _check_same_grid(a, b)
            self.height, self.width = a.height, a.width
            self.transform, self.crs = a.transform, a.crs
            self.bands = {"pre": bands.get("pre") or list(range(1, a.count + 1)),
                          "post": bands.get("post") or list(range(1, b.count + 1))}
            for date, raster in (("pre", a), ("post", b)):
                if max(self.bands[date]) > raster.count:
                    raise DataError(f"{name}: bands.{date} names band {max(self.bands[date])}, but {raster.name} has "
                                    f"{raster.count}")
            self.masked = {"pre": has_mask(a), "post": has_mask(b)}  # else no chip reads its masks
        self.polygons = None if _is_raster(label) else _read_polygons(label, self.crs)
        if self.polygons is None:
            with open_raster(label) as lab, open_raster(pre) as a:
                _check_same_grid(a, lab)
            # Checked whole: a chip may hold only some of the values (the 255 but not the 1 of a sparse label), and
            # only the whole label tells whether its nodata is its change value.
            check_change_value([label], ignore_value, "ignore_value:")

    def check_labelled(self, keys: list[str]) -> None:
        """Training chips ``keys`` where no label pixel is labelled (all the ignore value or the label's nodata) would
        train on nothing, with a loss of 0, silently: refused. The label is one band, cheap beside the dates (read whole
        by ``check_change_value`` too); the dates' nodata is only known chip by chip, as they are read."""
        if self.polygons is not None:
            return  # burnt polygons label every pixel
        raw, nodata = read_label(self.label)
        _, labelled = change_label(raw, self.label, self.ignore_value, "ignore_value:", nodata)
        if not any(labelled[self.window(key).toslices()].any() for key in keys):
            unlabelled = " or ".join(f"{value:g}" for value in (self.ignore_value, nodata) if value is not None)
            raise DataError(f"{self.name}: no pixel of its {len(keys)} training chips in {self.label} is labelled "
                            f"(all are {unlabelled}), so training would learn nothing from them; check "
                            "ignore_value and the label's nodata, or label some of the training area")

    @staticmethod
    def key(window: Window) -> str:
        return f"r{int(window.row_off)}_c{int(window.col_off)}_h{int(window.height)}_w{int(window.width)}"

    @staticmethod
    def window(key: str) -> Window:
        r, c, h, w = (int(part[1:]) for part in key.split("_"))
        return Window(c, r, w, h)

    def load(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        window = self.window(key)
        with open_raster(self.pre) as a, open_raster(self.post) as b:
            with _pixels_of(self.pre, key):
                pre = a.read(self.bands["pre"], window=window)
                valid = valid_mask(a, window, pre, self.bands["pre"], self.masked["pre"])
            with _pixels_of(self.post, key):
                post = b.read(self.bands["post"], window=window)
                valid &= valid_mask(b, window, post, self.bands["post"], self.masked["post"])
        nodata = None  # of burnt polygons
        if self.polygons is None:
            with open_raster(self.label) as lab, _pixels_of(self.label, key):
                raw, nodata = lab.read(1, window=window), label_nodata(lab)
        else:
            from rasterio.features import rasterize
            from rasterio.windows import transform as window_transform

            raw = rasterize(self.polygons, out_shape=(int(window.height), int(window.width)),
                            transform=window_transform(window, self.transform), fill=0, default_value=1,
                            dtype="uint8")
        return without_invalid(pre, post, binary_label(raw, f"{self.label} ({key})", self.ignore_value, nodata),
                               valid)


@contextlib.contextmanager
def _pixels_of(path: Path, key: str):
    """Reads of chip ``key`` of ``path``: a file damaged or cut short after its header opens and fails only at the
    read, which then names the file and the chip (``engine.rasters.corrupt_pixels``, as a folder dataset's do)."""
    try:
        yield
    except RasterioIOError as e:
        raise corrupt_pixels(f"{path} ({key})", e) from None


def without_invalid(pre: np.ndarray, post: np.ndarray, label: np.ndarray, valid: np.ndarray) -> tuple:
    """A chip whose pixels invalid in a date (nodata, NaN: not ``valid``) are ignored by the loss and the metrics,
    and zeroed so that no NaN reaches the model."""
    label[~valid] = IGNORE
    return (*zeroed_where_invalid(pre, post, valid), label)


def _check_same_grid(a, b) -> None:
    """Training chips are cut on one grid: the dates and a label raster must share it (no resampling)."""
    if (a.crs, a.width, a.height) != (b.crs, b.width, b.height) or not a.transform.almost_equals(b.transform):
        raise DataError(f"{b.name} is not on the grid of {a.name} (CRS, size or transform differ); "
                        "resample it onto that grid first")


def _is_raster(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff", ".png", ".jpg", ".img", ".vrt", ".jp2")


def _read_polygons(path: Path, crs) -> list:
    """Every polygon of a vector file (all layers), reprojected to ``crs``, as shapely geometries."""
    import shapely
    from osgeo import ogr, osr

    refuse_remote(path)
    ds = ogr.Open(str(path))
    if ds is None:
        raise DataError(f"{path}: not a readable raster or vector file")
    target = osr.SpatialReference()
    target.ImportFromWkt(crs.to_wkt())
    target.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    geometries = []
    for layer in ds:
        source = layer.GetSpatialRef()
        transform = None
        if source is not None:
            source.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
            transform = osr.CoordinateTransformation(source, target)
        for feature in layer:
            geometry = feature.GetGeometryRef()
            if geometry is None:
                continue
            geometry = geometry.Clone()
            if transform is not None:
                geometry.Transform(transform)
            geometries.append(shapely.from_wkb(bytes(geometry.ExportToWkb())))
    return geometries


# --- Splits --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One pair of a split: its source and its key there."""

    source: object
    key: str

    @property
    def id(self) -> str:
        return f"{self.source.name}/{self.key}"

    def load(self):
        return self.source.load(self.key)


def _split_names(names: list[str], split: dict, where: str) -> dict[str, list[str]]:
    """``names`` split by ratios ``{val, test, seed}`` (the rest train) or as named ``{train, val, test}``."""
    if set(split) <= {"val", "test", "seed"}:
        order = np.random.default_rng(split.get("seed", 0)).permutation(len(names))
        shuffled = [names[i] for i in order]
        n_val = round(split.get("val", 0) * len(names))
        n_test = round(split.get("test", 0) * len(names))
        for part, share, count in (("val", split.get("val", 0), n_val), ("test", split.get("test", 0), n_test)):
            if share > 0 and count == 0:  # asked for, and silently none: a run without validation or test
                raise DataError(f"{where}: split.{part} {share:g} of {len(names)} pairs is none; give a larger "
                                "share, or name the pairs")
        return {"val": sorted(shuffled[:n_val]), "test": sorted(shuffled[n_val:n_val + n_test]),
                "train": sorted(shuffled[n_val + n_test:])}
    return _named_splits(names, split, where)


def _named_splits(names: list[str], split: dict, where: str, field: str = "split") -> dict[str, list[str]]:
    """The splits ``split`` names (each a list of ``names``, each name once; a split not given is empty).
    ``field``: the config key that gave them, for errors."""
    known = set(names)
    unknown = [n for part in split.values() for n in part if n not in known]
    if unknown:
        raise DataError(f"{where}: split names not in the dataset: {', '.join(unknown[:10])}")
    # A pair in two splits would be validated or tested on after training on it; one listed twice, oversampled.
    listed = {}
    for s, part in split.items():
        for n in part:
            if n in listed:
                place = f"twice in {field}.{s}" if listed[n] == s else f"in both {field}.{listed[n]} and {field}.{s}"
                raise DataError(f"{where}: {n} is listed {place}; each pair belongs to one split, once")
            listed[n] = s
    return {s: list(split.get(s, [])) for s in SPLITS}


def _folder_splits(spec: dict) -> dict[str, list[Item]]:
    root = Path(spec["root"])
    if not root.is_dir():
        raise DataError(f"{root}: no such dataset folder")
    name = _dataset_name(spec)
    ignore = spec.get("ignore_value")
    if (root / "train").is_dir():
        if "lists" in spec:  # the split folders are the splits: lists would be ignored
            raise DataError(f"{root}: has train/ val/ test/ subfolders, which are its splits; lists are for a "
                            "dataset of one A/ B/ label/ folder")
        out = {}
        for s in SPLITS:
            if (root / s).is_dir():
                source = FolderSource(f"{name}/{s}", root / s, ignore)
                out[s] = [Item(source, k) for k in source.paths]
            else:
                out[s] = []
        if "split" in spec:  # a validation split carved out of train/ (sets such as OMBRIA have none)
            if (root / "val").is_dir() or set(spec["split"]) - {"val", "seed"}:
                raise DataError(f"{root}: split can only carve val (a ratio, and a seed) out of train/, "
                                "and only where there is no val/ folder")
            parts = _split_names([item.key for item in out["train"]], spec["split"], str(root / "train"))
            by_key = {item.key: item for item in out["train"]}
            out["train"], out["val"] = ([by_key[k] for k in parts[s]] for s in ("train", "val"))
        return out
    source = FolderSource(name, root, ignore)
    if "lists" in spec:
        names = {}
        for s, file in spec["lists"].items():
            path = root / file
            if not path.is_file():
                raise DataError(f"{path}: no such list file")
            names[s] = [Path(line.strip()).name for line in path.read_text().splitlines() if line.strip()]
        parts = _named_splits(list(source.paths), names, str(root), "lists")  # {val, test} too: names, not ratios
    elif "split" in spec:
        parts = _split_names(list(source.paths), spec["split"], str(root))
    else:
        raise DataError(f"{root}: has no train/ val/ test/ subfolders; give split or lists")
    return {s: [Item(source, k) for k in parts.get(s, [])] for s in SPLITS}


def _boxes(windows: list[Window]) -> np.ndarray:
    """``(n, 4)``: each window's first row and column, and the row and column past its last."""
    return np.array([[w.row_off, w.col_off, w.row_off + w.height, w.col_off + w.width] for w in windows]).reshape(-1, 4)


def _overlaps(window: Window, boxes: np.ndarray) -> bool:
    """Whether ``window`` shares a pixel with any of ``boxes`` (``_boxes``)."""
    r, c, r1, c1 = window.row_off, window.col_off, window.row_off + window.height, window.col_off + window.width
    return bool(((r < boxes[:, 2]) & (boxes[:, 0] < r1) & (c < boxes[:, 3]) & (boxes[:, 1] < c1)).any())


def _random_windows(source: RasterSource, chip: int, count: int, exclude: list[Window],
                    rng: np.random.Generator) -> list[str]:
    """``count`` chips at random positions overlapping none of ``exclude`` (the held-out chips)."""
    h, w, held = min(chip, source.height), min(chip, source.width), _boxes(exclude)
    keys = []
    for _ in range(count * 100):
        if len(keys) == count:
            break
        r, c = int(rng.integers(0, source.height - h + 1)), int(rng.integers(0, source.width - w + 1))
        window = Window(c, r, w, h)
        if not _overlaps(window, held):
            keys.append(RasterSource.key(window))
    if len(keys) < count:
        raise DataError(f"{source.name}: only {len(keys)} of {count} random chips avoid the held-out chips")
    return keys


def _raster_splits(spec: dict) -> dict[str, list[Item]]:
    pre, post, label = (Path(spec[k]) for k in ("pre", "post", "label"))
    source = RasterSource(_dataset_name(spec), pre, post, label, spec.get("bands"),
                          spec.get("ignore_value"))
    chip = spec.get("chip", 256)
    stride = spec.get("stride", chip)
    if stride > chip:
        raise DataError(f"{source.name}: stride {stride} leaves gaps between chips of {chip}")
    plan = WindowPlan(source.height, source.width, tile=chip, overlap=chip - stride)
    keys = [RasterSource.key(w) for w in plan.windows()]
    parts = _split_names(keys, spec["split"], source.name)
    before = {split: len(names) for split, names in parts.items()}
    # Grid chips overlap (a stride under the chip; the last chip flush with the far edge): no pixel in two splits.
    val = [RasterSource.window(k) for k in parts["val"]]
    val_boxes = _boxes(val)
    parts["test"] = [k for k in parts["test"] if not _overlaps(RasterSource.window(k), val_boxes)]
    held = val + [RasterSource.window(k) for k in parts["test"]]
    if spec.get("sampler", "grid") == "random":
        parts["train"] = _random_windows(source, chip, spec.get("samples", len(parts["train"])), held,
                                         np.random.default_rng([spec["split"].get("seed", 0), 1]))
    else:
        boxes = _boxes(held)
        parts["train"] = [k for k in parts["train"] if not _overlaps(RasterSource.window(k), boxes)]
    for split in ("train", "test"):
        if before[split] and not parts[split]:
            raise DataError(f"{source.name}: each of its {before[split]} {split} chips shares pixels with a chip held "
                            f"out for {'val' if split == 'test' else 'val or test'} (chip {chip}, stride {stride}); "
                            "use a stride nearer the chip, or fewer held-out chips")
    if parts["train"]:
        source.check_labelled(parts["train"])
    return {s: [Item(source, k) for k in parts.get(s, [])] for s in SPLITS}


def _dataset_name(spec: dict) -> str:
    """A dataset's ``name``, by default its folder's name or its pre raster's stem: the first part of its items'
    ids."""
    return spec.get("name", Path(spec["root"]).name if "root" in spec else Path(spec["pre"]).stem)


def build_splits(datasets: list[dict]) -> dict[str, list[Item]]:
    """The train / val / test items of all configured datasets, concatenated in config order."""
    # Items are known by their id, <dataset name>/<key> (MTKD's teachers pick their chips by it): names must differ.
    first = {}
    for i, spec in enumerate(datasets):
        name = _dataset_name(spec)
        if name in first:
            j = first[name]
            paths = [d.get("root") or d["pre"] for d in (datasets[j], spec)]
            raise DataError(f"data.datasets.{j} ({paths[0]}) and data.datasets.{i} ({paths[1]}) are both named "
                            f"{name!r}, so their items would share ids; give each a name:")
        first[name] = i
    out = {s: [] for s in SPLITS}
    for spec in datasets:
        parts = _folder_splits(spec) if "root" in spec else _raster_splits(spec)
        for s in SPLITS:
            out[s] += parts[s]
    return out


# --- Training stream -----------------------------------------------------------------------------

class TrainStream(torch.utils.data.Dataset):
    """Position ``k`` of the endless seeded stream over ``items`` (see the module docstring)."""

    def __init__(self, items: list[Item], augment, inputs: dict, seed: int, sar_db: bool = False):
        if not items:
            raise DataError("the training split is empty")
        self.items, self.augment, self.inputs, self.seed, self.sar_db = items, augment, inputs, seed, sar_db

    @functools.lru_cache(maxsize=2)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.items))

    def item_at(self, k: int) -> Item:
        epoch, position = divmod(k, len(self.items))
        return self.items[self._permutation(epoch)[position]]

    def __len__(self) -> int:  # the stream is endless; this is one epoch
        return len(self.items)

    def __getitem__(self, k: int) -> dict:
        item = self.item_at(k)
        pre, post, label = item.load()
        check_band_counts(pre, post, self.inputs, item.id, "set data.inputs or bands", DataError)
        for date, image in (("pre", pre), ("post", post)):
            _check_units(image, self.inputs[date], date, item.id)
            check_backscatter(image, self.inputs[date], self.sar_db, f"{item.id}: the {date} image")
        pre, post = (in_spec_units(image, self.inputs[date], self.sar_db) for date, image in (("pre", pre),
                                                                                             ("post", post)))
        rng = np.random.default_rng([self.seed, k, 0])
        pre, post, label = self.augment(pre, post, label, self.inputs, rng)
        # Augmented dates are float but still in the training data's units: its scale applies.
        return {"pre": normalise(pre[None], self.inputs["pre"], scale=self.inputs["pre"]["scale"])[0],
                "post": normalise(post[None], self.inputs["post"], scale=self.inputs["post"]["scale"])[0],
                "label": torch.from_numpy(np.ascontiguousarray(label)), "position": k}


def _check_units(image: np.ndarray, spec: dict, date: str, where: str) -> None:
    """Training divides a date by its input spec's scale. The package's users read a date of the spec's type the
    same way, one of another type by that type's usual scale (``engine.inputs.normalise``): data of another type
    would train a model that then reads its own kind of data otherwise. Float SAR is read from its backscatter
    whatever the spec's type (``in_spec_units``)."""
    dtype, expected = str(image.dtype), spec.get("dtype", "uint8")
    if dtype != expected and not (spec["modality"] == "sar" and image.dtype.kind == "f"):
        raise DataError(f"{where}: the {date} image is {dtype}, but data.inputs.{date} says {expected} (scale "
                        f"{spec['scale']:g}); set its dtype and scale to the data's")


def in_spec_units(image: np.ndarray, spec: dict, sar_db: bool) -> np.ndarray:
    """A date in the units its spec's scale divides. Float SAR (dB with ``sar_db``, else linear power) is mapped
    from the spec's dB window onto [0, 1], as the package's users read it (``engine.inputs.normalise``), times that
    scale, so that augmentation and normalising treat it as integer SAR. Other dates as they are."""
    if spec["modality"] != "sar" or image.dtype.kind != "f":
        return image
    unit = backscatter_unit_interval(torch.from_numpy(image).float(), spec, sar_db)
    return (unit * float(spec["scale"])).numpy()


def worker_error(error: GeoChangeError) -> GeoChangeError:
    """``error`` as raised in the loader's worker: torch raises it again in the main process with the worker's
    whole traceback as its message; the user gets the message's own lines."""
    text, name = str(error), type(error).__name__
    if "Original Traceback" not in text:
        return error
    lines = text.splitlines()
    last = max((i for i, line in enumerate(lines) if re.match(rf"[\w.]*{name}: ", line)), default=None)
    if last is None:
        return error
    return type(error)("\n".join([lines[last].split(f"{name}: ", 1)[1], *lines[last + 1:]]).strip())


class StreamSampler(torch.utils.data.Sampler):
    """Stream positions of this process for iterations ``start, start + 1, ...``: its slice of each
    global batch."""

    def __init__(self, start_iteration: int, global_batch: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise DataError(f"data.batch {global_batch} is not divisible by the {world_size} processes")
        self.start, self.batch, self.per_rank, self.rank = start_iteration, global_batch, \
            global_batch // world_size, rank

    def __iter__(self):
        iteration = self.start
        while True:
            first = iteration * self.batch + self.rank * self.per_rank
            yield from range(first, first + self.per_rank)
            iteration += 1


def train_loader(stream: TrainStream, start_iteration: int, global_batch: int, workers: int,
                 rank: int = 0, world_size: int = 1) -> torch.utils.data.DataLoader:
    sampler = StreamSampler(start_iteration, global_batch, rank, world_size)
    # A loader draws its workers' base seed from its generator: a private one leaves the global RNG (dropout,
    # drop-path, gate noise) untouched, so a resumed run continues the global RNG exactly.
    return torch.utils.data.DataLoader(stream, batch_size=sampler.per_rank, sampler=sampler,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(stream.seed))
