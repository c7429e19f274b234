"""The model package: one ``.safetensors`` file whose header metadata holds a JSON manifest.

Only tensors and JSON are read from a package; nothing is ever unpickled. The manifest says how to
build the model (registered architecture + constructor arguments), what each date must look like
(bands, modality, scaling, normalisation), what the output means and where the weights came from.
A package is checked before anything it describes is allocated: every manifest field's type and range
(``validate_manifest``), then the header's tensor names and shapes against the architecture built on
PyTorch's meta device (``build_checked_model``).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import itertools
import json
import math
import os
import pickletools
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.nn.modules.module import (register_module_buffer_registration_hook,
                                     register_module_parameter_registration_hook)

from geochange.engine import models
from geochange.engine.atomic import atomic_path
from geochange.engine.errors import GeoChangeError, OutputError
from geochange.engine.inputs import model_channels
from geochange.engine.windows import MIN_TILE
from geochange.engine.zoo import resolve_model

FORMAT = "geochange-model"
FORMAT_VERSION = 1
METADATA_KEY = "geochange"
# A build may register tensors it then drops (TinyCD builds an EfficientNet and keeps part of it: 805
# registered, 279 kept); one registering more than this many times the file's tensors cannot fit it.
BUILD_TENSORS_PER_FILE_TENSOR = 4
DEFAULT_TILE = 512  # the window of models whose manifest names none


class PackageError(GeoChangeError, ValueError):
    """A file is not a usable GeoChange model package; the message says why."""


@dataclass
class ModelPackage:
    model: torch.nn.Module
    manifest: dict
    path: Path | None = None

    @property
    def activation(self) -> str:
        return self.manifest["output"]["activation"]

    @property
    def threshold(self) -> float:
        return float(self.manifest["output"].get("threshold", 0.5))

    @property
    def tile(self) -> int:
        return model_tile(self.manifest)


def model_tile(manifest: dict) -> int:
    """The window a model was trained and tested on (the manifest's ``tile``), else ``DEFAULT_TILE``: a model
    that normalises each window by its own statistics (TinyCD's InstanceNorm) predicts best in that window."""
    return int(manifest.get("tile", DEFAULT_TILE))


def make_manifest(architecture: str, arch_kwargs: dict | None = None, *, inputs: dict | None = None,
                  threshold: float = 0.5, tile: int | None = None, training: dict | None = None,
                  licence: str = "", source: str = "") -> dict:
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
    router = " (a router package: use it with detect, or load it with engine.router.load_router)"
    need(fmt == FORMAT, where, "format", repr(FORMAT) + router * (fmt == "geochange-router"), fmt)
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
    need(isinstance(manifest.get("training", {}), dict), where, "training", "an object", manifest.get("training"))
    for key in ("licence", "source", "task"):
        need(isinstance(manifest.get(key, ""), str), where, key, "a string", manifest.get(key))


def write_package(tensors: dict, manifest: dict, path: str | os.PathLike) -> Path:
    """Write ``tensors`` and ``manifest`` (any format's) to ``path`` atomically, with the permissions the
    user's other new files get."""
    path = Path(path)
    if path.is_dir():
        raise PackageError(f"{path}: is a folder; name the package file, e.g. {path / 'model.safetensors'}")
    try:
        with atomic_path(path) as tmp:
            tmp.touch()  # created with the user's umask: safetensors alone would make the file 0600
            mode = tmp.stat().st_mode
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(manifest, sort_keys=True)})
            tmp.chmod(mode)
    except OutputError:
        raise
    except (OSError, SafetensorError) as e:
        raise PackageError(f"{path}: cannot be written ({e})") from None
    return path


def save_package(model: torch.nn.Module, manifest: dict, path: str | os.PathLike) -> Path:
    """Write ``model``'s state and ``manifest`` to ``path`` atomically."""
    validate_manifest(manifest, path)
    # safetensors refuses shared storage; contiguous clones keep the file self-contained.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    return write_package(tensors, manifest, path)


# Bytes of a file parsed to tell a protocol 0/1 pickle: its opening opcodes are enough, and the bound
# keeps a declared length (2**63 bytes) from being read or allocated.
PICKLE_SNIFF_BYTES = 2**16


def _is_pickle(head: bytes, path: Path) -> bool:
    """Whether the file opens as a pickle (``pickletools`` parses it, never runs it): protocol 2 and above
    open with PROTO; protocols 0 and 1 parse to STOP, or cleanly past half of what is read."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return True
    with open(path, "rb") as f:
        prefix = io.BytesIO(f.read(PICKLE_SNIFF_BYTES))
    position = 0
    try:
        for opcode, _, position in pickletools.genops(prefix):
            if opcode.name == "STOP":
                return True
    except Exception:  # noqa: BLE001 (unknown opcodes, absurd lengths, cut short: all end the parse)
        pass
    return position > PICKLE_SNIFF_BYTES // 2


def check_header(path: Path) -> None:
    """Name the common wrong files before safetensors gives a terse error."""
    if not path.is_file():
        raise PackageError(f"{path}: no such model file")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head, json_start = f.read(8), f.read(1)
        # torch.save writes a zip ("PK") or a bare pickle; a safetensors file's JSON header starts at byte 8.
        pickled = head[:2] == b"PK" or json_start != b"{" and _is_pickle(head, path)
    except OSError as e:
        raise PackageError(f"{path}: cannot be read ({e.strerror})") from None
    if pickled:
        raise PackageError(f"{path}: this is a PyTorch pickle checkpoint, not a GeoChange package; "
                           "it is never unpickled. Convert it with `geochange import-weights`.")
    if len(head) < 8:
        raise PackageError(f"{path}: not a model package (file of {size} bytes is too short)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > size - 8:
        raise PackageError(f"{path}: truncated or not a safetensors file (header claims "
                           f"{header_len} bytes, file has {size})")


def _read(path: Path, what):
    """``what(f)`` of the file opened by safetensors, which checks that the header's tensors lie within
    the file; its errors name the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return what(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise PackageError(f"{path}: not a valid safetensors file; it is corrupt or truncated ({e})") from None


def read_metadata(path: str | os.PathLike):
    """The manifest in a package's header as stored, of any format and not validated."""
    path = Path(path)
    check_header(path)
    meta = _read(path, lambda f: f.metadata()) or {}
    if METADATA_KEY not in meta:
        raise PackageError(f"{path}: a safetensors file without a GeoChange manifest "
                           f"(header metadata key {METADATA_KEY!r} is missing)")
    try:
        return json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise PackageError(f"{path}: the manifest is not valid JSON ({e})") from None


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a package, validated, without loading its tensors."""
    manifest = read_metadata(path)
    validate_manifest(manifest, path)
    return manifest


def read_shapes(path: Path) -> dict[str, tuple]:
    """Each tensor's shape as the header declares it; no tensor data is read."""
    return _read(path, lambda f: {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return _read(path, lambda f: {k: f.get_tensor(k) for k in f.keys()})


class _TooManyTensors(Exception):
    pass


@contextlib.contextmanager
def _registrations_at_most(limit: int):
    """Stop a model build in this thread once it has registered more than ``limit`` parameters and
    buffers: an absurd ``arch_kwargs`` (100,000 experts) would take minutes even on the meta device."""
    thread, count = threading.get_ident(), itertools.count(1)

    def hook(module, name, value):
        if threading.get_ident() == thread and next(count) > limit:
            raise _TooManyTensors

    handles = [register_module_parameter_registration_hook(hook), register_module_buffer_registration_hook(hook)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def build_checked_model(manifest: dict, shapes: dict[str, tuple], where) -> torch.nn.Module:
    """The manifest's architecture with random weights, built once its tensors are known to have the
    names and ``shapes`` of the file ``where``: the architecture is first built on the meta device,
    which allocates nothing, so that no ``arch_kwargs`` can make a small file take much memory."""
    architecture, kwargs = manifest["architecture"], manifest.get("arch_kwargs", {})
    described = f"{architecture} {json.dumps(kwargs)}" if kwargs else architecture
    try:
        factory = models.spec(architecture).factory
        with torch.device("meta"), _registrations_at_most(BUILD_TENSORS_PER_FILE_TENSOR * len(shapes)):
            expected = {k: tuple(v.shape) for k, v in factory(**kwargs).state_dict().items()}
    except _TooManyTensors:
        raise PackageError(f"{where}: weights do not fit {described}: it has more than "
                           f"{BUILD_TENSORS_PER_FILE_TENSOR} times the file's {len(shapes)} tensors") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise PackageError(f"{where}: cannot build {described}: {e.args[0] if e.args else e}") from None
    missing, unknown = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unknown:
        raise PackageError(f"{where}: weights do not fit {described}: " + "; ".join(
            f"{len(keys)} {what} tensor(s), e.g. {keys[:5]}" for what, keys in (("missing", missing),
                                                                              ("unknown", unknown)) if keys))
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise PackageError(f"{where}: weights do not fit {described}: tensor {name} has shape "
                               f"{list(shapes[name])} in the file, the architecture's is {list(shape)}")
    return factory(**kwargs)


def load_package(path: str | os.PathLike, device: str | torch.device = "cpu") -> ModelPackage:
    """Load a package (a file, or a zoo model's name): the model (eval mode, on ``device``) and its manifest."""
    path = resolve_model(path)
    manifest = read_manifest(path)
    model = build_checked_model(manifest, read_shapes(path), path)
    model.load_state_dict(read_tensors(path))
    model.eval().to(device)
    return ModelPackage(model=model, manifest=manifest, path=path)


def printable(value) -> str:
    """``value`` as text with control characters (terminal escapes, line breaks) shown escaped: text from
    a file must not drive the terminal it is printed on."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))


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
    rows.append(("tile", f"{model_tile(manifest)} px" + ("" if "tile" in manifest else " (none recorded: the default)")))
    for key, value in manifest.get("training", {}).items():
        rows.append((f"training.{key}", value if isinstance(value, str) else json.dumps(value)))
    rows += [(key, manifest[key]) for key in ("task", "source", "licence") if manifest.get(key)]
    rows = [(printable(label), printable(value)) for label, value in rows]
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label:<{width}}{value}" for label, value in rows)
