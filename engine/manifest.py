"""The manifests of the two package kinds, kept as JSON in a package's header: how they are made, checked
field by field, and shown as text.

A model package's manifest says how to build the model (registered architecture + constructor
arguments), what each date must look like (bands, modality, scaling, normalisation), what the output
means and where the weights came from. A router package's manifest holds the CAR thresholds and, for the
original model M_O and each teacher, the prefix of its tensors and its model manifest:
``{"format": "geochange-router", "format_version": 1, "thresholds": [...], "comparison": "<=",
"original": {"prefix", "manifest"}, "teachers": [{"name", "max_car", "prefix", "manifest"}, ...]}``.
"""
from __future__ import annotations

import copy
import inspect
import json
import math

from geochange.engine import models
from geochange.engine.errors import PackageError
from geochange.engine.inputs import model_channels
from geochange.engine.options import MIN_TILE

FORMAT = "geochange-model"
FORMAT_VERSION = 1
ROUTER_FORMAT = "geochange-router"
ROUTER_FORMAT_VERSION = 1
DEFAULT_TILE = 512  # the window of models whose manifest names none


def model_tile(manifest: dict) -> int:
    """The window a model was trained and tested on (the manifest's ``tile``), else ``DEFAULT_TILE``: a model
    that normalises each window by its own statistics (TinyCD's InstanceNorm) predicts best in that window."""
    return int(manifest.get("tile", DEFAULT_TILE))


def make_manifest(architecture: str, arch_kwargs: dict | None = None, *, inputs: dict | None = None,
                  threshold: float = 0.5, tile: int | None = None, gsd: float | None = None,
                  training: dict | None = None, licence: str = "", source: str = "") -> dict:
    """A package's manifest; ``tile``: the window it was trained on (px), ``gsd``: the metres per pixel of
    its training imagery (recorded where known; ``detect`` warns on rasters of another scale)."""
    spec = models.spec(architecture)
    if inputs is None:
        inputs = {"pre": spec.inputs[0], "post": spec.inputs[1]}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "arch_kwargs": dict(arch_kwargs or {}),
        "inputs": copy.deepcopy(inputs),  # not the registry's own specs, which a caller may change
        "output": {"classes": 1 if spec.activation == "sigmoid" else 2,
                   "activation": spec.activation, "threshold": threshold},
        "training": dict(training or {}),
        "licence": licence,
        "source": source,
    }
    if tile is not None:
        manifest["tile"] = tile
    if gsd is not None:
        manifest["gsd"] = gsd
    return manifest


def is_number(value) -> bool:
    """A finite JSON number (``true`` is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_count(value) -> bool:
    """A whole JSON number above 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def need(ok: bool, where, field: str, wanted: str, value) -> None:
    """Refuse a manifest ``field`` of the file ``where`` whose ``value`` is not ``wanted``."""
    if not ok:
        shown = repr(value)  # repr escapes control characters; a manifest may hold anything, cut it short
        raise PackageError(f"{where}: manifest field {field} must be {wanted}, not "
                           f"{shown if len(shown) <= 60 else shown[:57] + '...'}")


def _required(mapping: dict, key: str, where, field: str):
    if key not in mapping:
        raise PackageError(f"{where}: manifest field {field} is missing")
    return mapping[key]


def _validate_arch_kwargs(architecture: str, kwargs: dict, where) -> None:
    """Each argument must be one the factory takes, of its default's type: counts (channels, experts)
    above 0, rates not negative."""
    parameters = _factory_parameters(architecture)
    if not parameters:
        return
    for key, value in kwargs.items():
        field = f"arch_kwargs.{key}"
        if key not in parameters:
            raise PackageError(f"{where}: manifest field {field} is not an argument of {architecture} "
                               f"(it takes {', '.join(parameters)})")
        default = parameters[key].default
        if isinstance(default, bool):
            need(isinstance(value, bool), where, field, "true or false", value)
        elif isinstance(default, int):
            need(is_count(value), where, field, "a whole number above 0", value)
        elif isinstance(default, float):
            need(is_number(value) and value >= 0, where, field, "a number of 0 or more", value)
        elif isinstance(default, str):
            need(isinstance(value, str), where, field, "a string", value)


def _factory_parameters(architecture: str) -> dict:
    """The registered factory's parameters (empty for an unknown architecture: refused when built, still
    described by ``info``)."""
    try:
        return dict(inspect.signature(models.spec(architecture).factory).parameters)
    except KeyError:
        return {}


def _validate_channels(architecture: str, kwargs: dict, inputs: dict, where) -> None:
    """A model built for ``in_chans`` channels must be fed that many by each date's input spec."""
    parameters = _factory_parameters(architecture)
    if "in_chans" in parameters:
        built = kwargs.get("in_chans", parameters["in_chans"].default)
        for date in ("pre", "post"):
            fed = model_channels(inputs[date])
            need(fed == built, where, f"inputs.{date}", f"{built} channel(s), as arch_kwargs.in_chans builds the "
                 f"model for (its bands, or replicate)", f"{fed} channel(s)")


def _validate_input(spec, where, field: str) -> None:
    need(isinstance(spec, dict), where, field, "an object", spec)
    bands = _required(spec, "bands", where, f"{field}.bands")
    need(is_count(bands), where, f"{field}.bands", "a whole number above 0", bands)
    modality = _required(spec, "modality", where, f"{field}.modality")
    need(modality in ("optical", "sar"), where, f"{field}.modality", "'optical' or 'sar'", modality)
    if "replicate" in spec:
        need(is_count(spec["replicate"]), where, f"{field}.replicate", "a whole number above 0", spec["replicate"])
    need(isinstance(spec.get("dtype", ""), str), where, f"{field}.dtype", "a type name", spec.get("dtype"))
    scale = _required(spec, "scale", where, f"{field}.scale")
    need(is_number(scale) and scale > 0, where, f"{field}.scale", "a number above 0 (the raw value meaning 1.0)",
         scale)
    channels = model_channels(spec)
    for key, above_zero in (("mean", False), ("std", True)):
        values = _required(spec, key, where, f"{field}.{key}")
        need(isinstance(values, list) and len(values) == channels
             and all(is_number(v) and (v > 0 or not above_zero) for v in values),
             where, f"{field}.{key}", f"a list of {channels} numbers" + " above 0" * above_zero, values)
    if "db_range" in spec:
        db = spec["db_range"]
        need(isinstance(db, list) and len(db) == 2 and all(map(is_number, db)) and db[0] < db[1],
             where, f"{field}.db_range", "[low, high] in dB, low below high", db)


def validate_manifest(manifest, where) -> None:
    """Check the type and range of every field of a package's manifest, so that nothing later meets a
    malformed value; a ``PackageError`` names the file (``where``) and the first field that is wrong."""
    if not isinstance(manifest, dict):
        raise PackageError(f"{where}: the manifest must be a JSON object, not {type(manifest).__name__}")
    fmt = manifest.get("format")
    router = " (a router package: use it with detect, or load it with engine.package.load_router)"
    need(fmt == FORMAT, where, "format", repr(FORMAT) + router * (fmt == ROUTER_FORMAT), fmt)
    need(manifest.get("format_version") == FORMAT_VERSION, where, "format_version",
         f"{FORMAT_VERSION} (the version this engine reads)", manifest.get("format_version"))
    architecture = manifest.get("architecture")
    need(isinstance(architecture, str), where, "architecture", "an architecture name", architecture)
    kwargs = manifest.get("arch_kwargs", {})
    need(isinstance(kwargs, dict), where, "arch_kwargs", "an object", kwargs)
    _validate_arch_kwargs(architecture, kwargs, where)
    inputs = manifest.get("inputs")
    need(isinstance(inputs, dict) and set(inputs) == {"pre", "post"}, where, "inputs",
         "an object naming 'pre' and 'post'", inputs)
    for date in ("pre", "post"):
        _validate_input(inputs[date], where, f"inputs.{date}")
    _validate_channels(architecture, kwargs, inputs, where)
    output = manifest.get("output")
    need(isinstance(output, dict), where, "output", "an object", output)
    activation = output.get("activation")
    need(activation in ("sigmoid", "softmax"), where, "output.activation", "'sigmoid' or 'softmax'", activation)
    classes = 1 if activation == "sigmoid" else 2
    need(output.get("classes", classes) == classes, where, "output.classes", f"{classes} for {activation}",
         output.get("classes"))
    if "threshold" in output:
        threshold = output["threshold"]
        need(is_number(threshold) and 0 <= threshold <= 1, where, "output.threshold", "a number in [0, 1]",
             threshold)
    if "tile" in manifest:
        need(is_count(manifest["tile"]) and manifest["tile"] >= MIN_TILE, where, "tile",
             f"a whole number of pixels, at least {MIN_TILE}", manifest["tile"])
    if "gsd" in manifest:
        need(is_number(manifest["gsd"]) and manifest["gsd"] > 0, where, "gsd", "metres per pixel, above 0",
             manifest["gsd"])
    need(isinstance(manifest.get("training", {}), dict), where, "training", "an object", manifest.get("training"))
    for key in ("licence", "source", "task"):
        need(isinstance(manifest.get(key, ""), str), where, key, "a string", manifest.get(key))


def is_router(manifest) -> bool:
    """Whether a header's manifest, as stored, is a router package's."""
    return isinstance(manifest, dict) and manifest.get("format") == ROUTER_FORMAT


def validate_router(manifest, where) -> None:
    """Check every field of a router manifest, each member's manifest included (``validate_manifest``)."""
    if not is_router(manifest):
        raise PackageError(f"{where}: not a router package (format "
                           f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    need(manifest.get("format_version") == ROUTER_FORMAT_VERSION, where, "format_version",
         f"{ROUTER_FORMAT_VERSION} (the version this engine reads)", manifest.get("format_version"))
    thresholds = manifest.get("thresholds")
    need(isinstance(thresholds, list) and all(is_number(t) and 0 <= t <= 1 for t in thresholds)
         and thresholds == sorted(thresholds), where, "thresholds", "increasing CAR thresholds in [0, 1]",
         thresholds)
    teachers = manifest.get("teachers")
    need(isinstance(teachers, list) and len(teachers) == len(thresholds) + 1, where, "teachers",
         f"a list of {len(thresholds) + 1} teachers (one more than the thresholds)", teachers)
    members = [("original", manifest.get("original"))] + [(f"teachers[{i}]", t) for i, t in enumerate(teachers)]
    for field, entry in members:
        need(isinstance(entry, dict) and isinstance(entry.get("prefix"), str), where, field,
             "an object with a tensor name prefix", entry)
        if field != "original":
            need(isinstance(entry.get("name"), str), where, f"{field}.name", "a name", entry.get("name"))
            need(entry.get("max_car") is None or is_number(entry["max_car"]), where, f"{field}.max_car",
                 "a number or null", entry.get("max_car"))
        validate_manifest(entry.get("manifest"), f"{where} [{field}]")


def printable(value) -> str:
    """``value`` as text with control characters (terminal escapes, line breaks) shown escaped: text from
    a file must not drive the terminal it is printed on."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


LONGEST = 120  # characters of a value ``format_manifest`` shows


def format_manifest(manifest: dict) -> str:
    """A validated manifest as readable text (``geochange info``)."""
    rows = [("architecture", f"{manifest['architecture']} {json.dumps(manifest.get('arch_kwargs', {}))}")]
    for date in ("pre", "post"):
        s = manifest["inputs"][date]
        rep = f", replicated to {s['replicate']}" if "replicate" in s else ""
        rows.append((f"input {date}", f"{s['bands']} band(s) {s['modality']}{rep}; {s.get('dtype', 'uint8')} "
                                      f"/ {s['scale']:g}, mean {s['mean']}, std {s['std']}"))
    out = manifest["output"]
    rows.append(("output", f"{1 if out['activation'] == 'sigmoid' else 2} channel(s), {out['activation']}, "
                           f"threshold {out.get('threshold', 0.5)}"))
    rows.append(("tile", f"{model_tile(manifest)} px"
                 + ("" if "tile" in manifest else " (none recorded: the default)")))
    if "gsd" in manifest:
        rows.append(("pixel size", f"{manifest['gsd']:g} m (of the training imagery)"))
    for key, value in manifest.get("training", {}).items():
        text = value if isinstance(value, str) else json.dumps(value)
        # A training run's config and figures run to kilobytes: one line of a screen's width, the rest in --json.
        rows.append((f"training.{key}", text if len(text) <= LONGEST else f"{text[:LONGEST]}... (--json: all)"))
    rows += [(key, manifest[key]) for key in ("task", "source", "licence") if manifest.get(key)]
    rows = [(printable(label), printable(value)) for label, value in rows]
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label:<{width}}{value}" for label, value in rows)


def format_router(manifest: dict) -> str:
    """A validated router manifest as readable text: its thresholds, then each member's manifest."""
    members = [("original", manifest["original"])] + [
        (f"teacher {printable(t['name'])} (CAR <= {t['max_car']})", t) for t in manifest["teachers"]]
    return f"O-P router: CAR thresholds {manifest['thresholds']} (CAR <= threshold picks the teacher)" + "".join(
        f"\n[{role}]\n{format_manifest(entry['manifest'])}" for role, entry in members)
