"""The model package: one ``.safetensors`` file whose header metadata holds a JSON manifest.

Only tensors and JSON are read from a package; nothing is ever unpickled. The manifest says how to
build the model (registered architecture + constructor arguments), what each date must look like
(bands, modality, scaling, normalisation), what the output means and where the weights came from.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from geochange.engine import models
from geochange.engine.atomic import atomic_path
from geochange.engine.errors import GeoChangeError
from geochange.engine.inputs import model_channels

FORMAT = "geochange-model"
FORMAT_VERSION = 1
METADATA_KEY = "geochange"


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


def make_manifest(architecture: str, arch_kwargs: dict | None = None, *, inputs: dict | None = None,
                  threshold: float = 0.5, training: dict | None = None, licence: str = "",
                  source: str = "") -> dict:
    spec = models.spec(architecture)
    if inputs is None:
        inputs = {"pre": spec.inputs[0], "post": spec.inputs[1]}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "arch_kwargs": dict(arch_kwargs or {}),
        "inputs": inputs,
        "output": {"classes": 1 if spec.activation == "sigmoid" else 2,
                   "activation": spec.activation, "threshold": threshold},
        "training": dict(training or {}),
        "licence": licence,
        "source": source,
    }


def validate_manifest(manifest: dict) -> None:
    def need(cond, what):
        if not cond:
            raise PackageError(f"invalid manifest: {what}")

    need(isinstance(manifest, dict), "not a JSON object")
    need(manifest.get("format") == FORMAT, f"format is {manifest.get('format')!r}, expected {FORMAT!r}"
         + (" (a router package: use it with detect, or load it with engine.router.load_router)"
            if manifest.get("format") == "geochange-router" else ""))
    need(manifest.get("format_version") == FORMAT_VERSION,
         f"format_version {manifest.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
    need(isinstance(manifest.get("architecture"), str), "no architecture name")
    need(isinstance(manifest.get("arch_kwargs", {}), dict), "arch_kwargs is not an object")
    inputs = manifest.get("inputs")
    need(isinstance(inputs, dict) and set(inputs) == {"pre", "post"}, "inputs must name 'pre' and 'post'")
    for date, spec in inputs.items():
        need(isinstance(spec, dict), f"inputs.{date} is not an object")
        for key in ("bands", "modality", "scale", "mean", "std"):
            need(key in spec, f"inputs.{date} lacks {key!r}")
        need(spec["modality"] in ("optical", "sar"), f"inputs.{date}.modality is {spec['modality']!r}")
        channels = model_channels(spec)
        need(len(spec["mean"]) == channels and len(spec["std"]) == channels,
             f"inputs.{date}: mean/std need {channels} values")
    output = manifest.get("output")
    need(isinstance(output, dict) and output.get("activation") in ("sigmoid", "softmax"),
         "output.activation must be sigmoid or softmax")


def save_package(model: torch.nn.Module, manifest: dict, path: str | os.PathLike) -> Path:
    """Write ``model``'s state and ``manifest`` to ``path`` atomically."""
    validate_manifest(manifest)
    # safetensors refuses shared storage; contiguous clones keep the file self-contained.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(manifest, sort_keys=True)})
    return path


def check_header(path: Path) -> None:
    """Name the common wrong files before safetensors gives a terse error."""
    if not path.is_file():
        raise PackageError(f"{path}: no such model file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head, json_start = f.read(8), f.read(1)
    # torch.save writes a zip ("PK") or a bare pickle (0x80, protocol); a safetensors header length may
    # also start with byte 0x80, but its JSON header follows at byte 8.
    if head[:2] == b"PK" or head[:1] == b"\x80" and json_start != b"{":
        raise PackageError(f"{path}: this is a PyTorch pickle checkpoint, not a GeoChange package; "
                           "it is never unpickled. Convert it with `geochange import-weights`.")
    if len(head) < 8:
        raise PackageError(f"{path}: not a model package (file of {size} bytes is too short)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > size - 8:
        raise PackageError(f"{path}: truncated or not a safetensors file (header claims "
                           f"{header_len} bytes, file has {size})")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a package, validated, without loading its tensors."""
    path = Path(path)
    check_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise PackageError(f"{path}: not a valid safetensors file; it is corrupt or truncated ({e})") from None
    if METADATA_KEY not in meta:
        raise PackageError(f"{path}: a safetensors file without a GeoChange manifest "
                           f"(header metadata key {METADATA_KEY!r} is missing)")
    try:
        manifest = json.loads(meta[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise PackageError(f"{path}: the manifest is not valid JSON ({e})") from None
    validate_manifest(manifest)
    return manifest


def _read_tensors(path: Path) -> dict:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise PackageError(f"{path}: tensors cannot be read, the file is corrupt or truncated ({e})") from None


def load_package(path: str | os.PathLike, device: str | torch.device = "cpu") -> ModelPackage:
    """Load a package: the model (eval mode, on ``device``) and its manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        model = models.create(manifest["architecture"], **manifest.get("arch_kwargs", {}))
    except (KeyError, TypeError) as e:
        raise PackageError(f"{path}: cannot build architecture {manifest['architecture']!r}: {e}") from None
    state = _read_tensors(path)
    result = model.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"missing {len(result.missing_keys)} tensors, e.g. {result.missing_keys[:5]}")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unknown tensors, e.g. {result.unexpected_keys[:5]}")
    if problems:
        raise PackageError(f"{path}: weights do not fit {manifest['architecture']}: " + "; ".join(problems))
    model.eval().to(device)
    return ModelPackage(model=model, manifest=manifest, path=path)


def format_manifest(manifest: dict) -> str:
    """The manifest as readable text (``geochange info``)."""
    rows = [("architecture", f"{manifest['architecture']} {json.dumps(manifest.get('arch_kwargs', {}))}")]
    for date in ("pre", "post"):
        s = manifest["inputs"][date]
        rep = f", replicated to {s['replicate']}" if "replicate" in s else ""
        rows.append((f"input {date}", f"{s['bands']} band(s) {s['modality']}{rep}; {s.get('dtype', 'uint8')} "
                                      f"/ {s['scale']:g}, mean {s['mean']}, std {s['std']}"))
    out = manifest["output"]
    rows.append(("output", f"{out['classes']} channel(s), {out['activation']}, threshold {out['threshold']}"))
    for key, value in manifest.get("training", {}).items():
        rows.append((f"training.{key}", value if isinstance(value, str) else json.dumps(value)))
    rows += [(key, manifest[key]) for key in ("source", "licence") if manifest.get(key)]
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label:<{width}}{value}" for label, value in rows)
