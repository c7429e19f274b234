"""The options of a detection run, defined once: name, type, default, choices, bounds and help.

``DetectOptions`` is what ``detect``, ``evaluate_folder`` and ``distributed_detect`` take; the command line
(``engine/cli.py``), the QGIS parameters and their help (``qgis_plugin/parameters.py``) and the worker's
JSON job are all built from its fields, so adding an option touches this file (and its tests) only.
Standard library only: the plugin imports it in QGIS's own Python.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from geochange.engine.errors import OptionError

# Models see windows padded to a multiple of 32 px (their largest reduction, see predictor.SIZE_MULTIPLE):
# a smaller tile only multiplies the windows (and their padding) without seeing less.
MIN_TILE = 32
# Where the engine's fields are for: detection, and evaluation on a folder dataset.
DETECT, EVALUATE = "detect", "evaluate"
# The resolution that reads both dates at the model's pixel size (its package's gsd).
MODEL_RESOLUTION = "model"


def option(default, *, kind: str, parameter: str, label: str, help: str, choices: tuple = (),
           minimum: float | None = None, maximum: float | None = None, above: bool = False, unit: str = "",
           words: tuple = (), advanced: bool = False, parent: str | None = None, evaluate: bool = False):
    """A field of ``DetectOptions`` with what the front ends need to offer it.

    ``kind``: int, float, bool, choice, bands (1-based band numbers of the raster parameter ``parent``),
    crs, vector (a file of polygons) or text. ``parameter``: the QGIS parameter's name (kept by saved
    models and scripts), ``label`` its caption; ``help`` is plain text for both ``--help`` and QGIS's help.
    ``minimum``: the least value (exclusive when ``above``), in ``unit``; ``maximum``: the largest; ``words``: texts
    a number option also takes (the front ends then offer it as text, see ``number_or_word``). A default
    of None means "unset": the engine then decides (the help says how).
    """
    return field(default=default, metadata={
        "kind": kind, "parameter": parameter, "label": label, "help": help, "choices": tuple(choices),
        "minimum": minimum, "maximum": maximum, "above": above, "unit": unit, "words": tuple(words),
        "advanced": advanced, "parent": parent,
        "commands": (DETECT, EVALUATE) if evaluate else (DETECT,)})


@dataclass(frozen=True)
class DetectOptions:
    """How a pair is detected; each value is checked on construction (``OptionError`` names the option)."""

    pre_bands: tuple[int, ...] | None = option(
        None, kind="bands", parameter="PRE_BANDS", label="Pre-change bands, in the model's order", parent="PRE",
        help="1-based bands of the pre raster to give the model, in the model's order (e.g. 3,2,1 for a BGR "
             "file and an RGB model). Default: all bands, which must then be as many as the model expects "
             "(its manifest lists them).")
    post_bands: tuple[int, ...] | None = option(
        None, kind="bands", parameter="POST_BANDS", label="Post-change bands, in the model's order", parent="POST",
        help="Bands of the post raster, as for the pre raster (e.g. 1).")
    grid: str = option(
        "pre", kind="choice", parameter="GRID", label="Output grid (the pre or the post raster's)",
        choices=("pre", "post"),
        help="Whose grid (CRS, pixel size, pixel lattice) the outputs take; the other date is resampled onto it "
             "(bilinear). The outputs cover the intersection of both footprints.")
    device: str = option(
        "auto", kind="text", parameter="DEVICE", label="Device (auto, cpu, cuda, cuda:N)", evaluate=True,
        help="auto (a GPU when one is usable, else the CPU), cpu, cuda or a given GPU such as cuda:0.")
    tile: int | None = option(
        None, kind="int", parameter="TILE_SIZE", label="Tile size (pixels; empty = the model's)", minimum=MIN_TILE,
        unit=" px", evaluate=True,
        help=f"Side in pixels of the square windows given to the network, at least {MIN_TILE}. Default: the tile "
             "the model was trained on (its package records it; 512 for packages that do not). A model that "
             "normalises each window by its own statistics (TinyCD) predicts best in that window.")
    overlap: int = option(
        64, kind="int", parameter="OVERLAP", label="Tile overlap (pixels)", minimum=0, unit=" px", evaluate=True,
        help="Pixels shared by neighbouring windows, less than the tile; their predictions are blended so that "
             "no seams appear.")
    batch: int = option(
        4, kind="int", parameter="BATCH_SIZE", label="Batch size (tiles)", minimum=1, unit=" window", evaluate=True,
        help="Windows run together; lower it if memory runs out (it is lowered for you where the machine's "
             "memory cannot hold it).")
    threshold: float | None = option(
        None, kind="float", parameter="THRESHOLD", label="Change threshold (empty = the model's)", minimum=0.0,
        maximum=1.0, evaluate=True,
        help="Probability above which a pixel counts as changed, in [0, 1]. Default: the threshold stored in the "
             "model package (usually 0.5).")
    min_area: float = option(
        20.0, kind="float", parameter="MIN_AREA", label="Minimum polygon area (m²)", minimum=0.0, unit=" m²",
        help="Change polygons smaller than this many square metres (geodesic, whatever the CRS; planar in a local "
             "CRS) are dropped, and "
             "holes smaller than it filled: the default drops specks of a few pixels at 0.5 m and nothing at "
             "10 m. Pixels for two rasters without a CRS.")
    simplify: float = option(
        0.5, kind="float", parameter="SIMPLIFY", label="Simplify tolerance (m)", minimum=0.0, unit=" m",
        help="Polygon outlines are simplified so that they stray at most this many metres from the pixel "
             "outlines, whatever the CRS (in a geographic CRS, as degrees of latitude); 0 keeps the pixel "
             "outlines. Pixels for two rasters without a CRS.")
    sar_db: bool = option(
        False, kind="bool", parameter="SAR_DB", label="SAR rasters are in dB", evaluate=True,
        help="Float SAR rasters hold backscatter in dB (otherwise linear power is assumed). Only for models "
             "whose manifest marks a date as SAR.")
    tta: bool = option(
        False, kind="bool", parameter="TTA", label="Test-time augmentation (scales x flips)", evaluate=True,
        help="Test-time augmentation: the mean of the change probabilities of every window resized by the "
             "scales the model was tested with, as it is and flipped left-right (0.75, 1 and 1.25 when the "
             "package records none: six passes, often slightly more accurate).")
    aoi: str | None = option(
        None, kind="vector", parameter="AOI", label="Area of interest (polygons; empty = everywhere)",
        help="Polygons (a vector file, or FILE|layername=NAME) that limit the run: only the windows that touch "
             "them run, so the time follows the area, and pixels outside them are nodata. In any CRS.")
    crs: str | None = option(
        None, kind="crs", parameter="CRS", label="Output CRS (empty = the grid raster's)", advanced=True,
        help="Read both dates in this CRS instead of the grid raster's (e.g. EPSG:32614).")
    resolution: float | str | None = option(
        None, kind="float", parameter="RESOLUTION",
        label="Output pixel size (empty = the grid raster's; model = read at the model's)", minimum=0.0, above=True,
        words=(MODEL_RESOLUTION,), advanced=True,
        help="Pixel size of the common grid, in the units of its CRS. Default: the grid raster's. model: both dates "
             "are read at the pixel size the model was trained on (the ground sampling distance its package "
             "records, in metres), the model runs there, and its probability is resampled (bilinear) onto the "
             "grid raster's grid, where the mask and polygons are made: for rasters whose pixels are far finer or "
             "coarser than the model's.")
    pre_scale: float | None = option(
        None, kind="float", parameter="PRE_SCALE", label="Pre raw value meaning 1.0 (empty = by data type)",
        minimum=0.0, above=True, advanced=True,
        help="The raw pre value that means 1.0 to the model. Default: the model's when the data types agree, "
             "else by data type (255 for 8-bit, 10000 for 16-bit reflectance, 1 for float).")
    post_scale: float | None = option(
        None, kind="float", parameter="POST_SCALE", label="Post raw value meaning 1.0 (empty = by data type)",
        minimum=0.0, above=True, advanced=True, help="The same for the post raster.")
    precision: str = option(
        "auto", kind="choice", parameter="PRECISION", label="Precision", choices=("auto", "bf16", "fp16", "fp32"),
        advanced=True, evaluate=True,
        help="Arithmetic of the model (autocast; inputs, routing and probabilities stay fp32). auto: bf16 on a GPU, "
             "and on a CPU that computes bf16 natively (Intel AMX, AVX512-BF16), else fp32; the log says which "
             "and why. bf16 and fp16 are faster and use less memory; fp16 is for GPUs (a CPU runs fp32). fp32 "
             "gives the figures a package records.")
    backend: str = option(
        "auto", kind="choice", parameter="BACKEND", label="CPU runtime",
        choices=("auto", "eager", "compile", "openvino"), advanced=True, evaluate=True,
        help="What runs the model on a CPU. auto: OpenVINO where it is installed (measured two to three times "
             "faster than PyTorch's fp32 on an AVX512-BF16 CPU), else PyTorch; eager: PyTorch; compile: "
             "torch.compile graphs (each window shape compiled the first time, a minute or more; cached on disk); "
             "openvino: OpenVINO (the model exported once, checked against PyTorch and cached). A model that "
             "cannot run so runs in PyTorch and the log says why. On a GPU the model runs in PyTorch (CUDA graphs).")
    threads: int | None = option(
        None, kind="int", parameter="THREADS", label="CPU threads (empty = all)", minimum=1, advanced=True,
        help="CPU threads PyTorch may use. Default: PyTorch's (all cores). A setting of the whole process: the "
             "command line and the worker apply it (engine.process.configure_process); detect itself leaves "
             "the process alone.")

    def __post_init__(self):
        for spec in fields(self):
            value = _checked(spec, getattr(self, spec.name))
            object.__setattr__(self, spec.name, value)
        if self.tile is not None and self.overlap >= self.tile:
            raise OptionError(f"--overlap must be in [0, tile) = [0, {self.tile}), not {self.overlap}")

    @classmethod
    def of(cls, values: dict, command: str = DETECT) -> DetectOptions:
        """Options from keyword arguments (a JSON job, a caller's ``**options``); a name that is not an
        option of ``command`` is refused with the known ones."""
        known = names(command)
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise OptionError(f"unknown {command} option{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                              f"known: {', '.join(known)}")
        return cls(**values)


def specs(command: str = DETECT) -> list:
    """The fields of ``command``'s options, in their order (``field.metadata`` holds the rest)."""
    return [spec for spec in fields(DetectOptions) if command in spec.metadata["commands"]]


def spec(name: str):
    """The field of option ``name``."""
    return next(option for option in fields(DetectOptions) if option.name == name)


def names(command: str = DETECT) -> list[str]:
    return [spec.name for spec in specs(command)]


def flag(name: str) -> str:
    """The command-line spelling of an option (``pre_bands`` -> ``--pre-bands``)."""
    return "--" + name.replace("_", "-")


def _checked(spec, value):
    """``value`` of the option ``spec`` in its type, or an ``OptionError`` naming the option as the command
    line spells it (the QGIS worker client turns that into the parameter's name)."""
    meta, name = spec.metadata, flag(spec.name)
    if value is None:
        if spec.default is not None:
            raise OptionError(f"{name} needs a value (default {spec.default})")
        return None
    kind = meta["kind"]
    if value in meta["words"]:
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise OptionError(f"{name} must be true or false, not {value!r}")
        return value
    if kind in ("choice", "text", "crs", "vector"):
        if not isinstance(value, str) or (meta["choices"] and value not in meta["choices"]):
            expected = f"one of {', '.join(meta['choices'])}" if meta["choices"] else "a text"
            raise OptionError(f"{name} must be {expected}, not {value!r}")
        return value
    if kind == "bands":
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise OptionError(f"{name} must be a list of 1-based band numbers, not {value!r}")
        bands = tuple(value)
        if not bands or not all(_is_int(b) and b >= 1 for b in bands):
            raise OptionError(f"{name} must be 1-based band numbers like 3,2,1, not {list(bands)}")
        return tuple(int(b) for b in bands)
    low, high = meta["minimum"], meta["maximum"]
    number = _is_int(value) or (kind == "float" and isinstance(value, float) and math.isfinite(value))
    if high is not None:
        bounds, fits = f" in [{low:g}, {high:g}]", number and low <= value <= high
    elif low is not None:
        bounds = f" {'above' if meta['above'] else 'at least'} {low:g}{meta['unit']}"
        fits = number and (value > low if meta["above"] else value >= low)
    else:
        bounds, fits = "", number
    if not fits:
        words = "".join(f" or {word}" for word in meta["words"])
        raise OptionError(f"{name} must be a {'whole ' * (kind == 'int')}number{bounds}{words}, not {value!r}")
    return int(value) if kind == "int" else float(value)


def number_or_word(text: str, words) -> float | str:
    """A command line's or a QGIS text field's value of a number option that also takes ``words``: the word, else
    the number; else the text as it is, which the option's check refuses, naming the option."""
    text = text.strip()
    if text in words:
        return text
    try:
        return float(text)
    except ValueError:
        return text


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
