"""Model packages and router packages: each one ``.safetensors`` file whose header metadata (key
``geochange``) holds a JSON manifest (``engine.manifest``), whose ``format`` tells the two kinds apart.

A model package holds one model's tensors. A router package, for the MTKD paper's O-P inference
(``engine.routing``), holds those of the original model M_O under ``original.`` and of each teacher
under ``teacher.<name>.``. Only tensors and JSON are read from a package; nothing is ever unpickled. A
package is checked before anything it describes is allocated: every manifest field's type and range,
then the header's tensor names and shapes against each architecture built on PyTorch's meta device
(``build_checked_model``).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
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
from geochange.engine.errors import OutputError, PackageError
from geochange.engine.header import METADATA_KEY, read_metadata
from geochange.engine.manifest import (ROUTER_FORMAT, ROUTER_FORMAT_VERSION, format_manifest, format_router,
                                       is_router, model_tile, printable, validate_manifest, validate_router)
from geochange.engine.metrics import json_ready
from geochange.engine.zoo import resolve_model

# A build may register tensors it then drops (TinyCD builds an EfficientNet and keeps part of it: 805
# registered, 279 kept); one registering more than this many times the file's tensors cannot fit it.
BUILD_TENSORS_PER_FILE_TENSOR = 4


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


@dataclass
class RouterPackage:
    original: ModelPackage
    teachers: list[tuple[str, ModelPackage]]
    thresholds: list[float]
    manifest: dict
    path: Path | None = None

    @property
    def threshold(self) -> float:
        return self.original.threshold


# --- The file ------------------------------------------------------------------------------------

def _read(path: Path, what):
    """``what(f)`` of the file opened by safetensors, which checks that the header's tensors lie within
    the file; its errors name the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return what(f)
    except (SafetensorError, OSError, ValueError) as e:
        raise PackageError(f"{path}: not a valid safetensors file; it is corrupt or truncated ({e})") from None


def read_shapes(path: Path) -> dict[str, tuple]:
    """Each tensor's shape as the header declares it; no tensor data is read."""
    return _read(path, lambda f: {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return _read(path, lambda f: {k: f.get_tensor(k) for k in f.keys()})


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
            text = json.dumps(json_ready(manifest), sort_keys=True, allow_nan=False)  # a NaN metric: null
            save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
            tmp.chmod(mode)
    except OutputError:
        raise
    except (OSError, SafetensorError) as e:
        raise PackageError(f"{path}: cannot be written ({e})") from None
    return path


# --- Reading and loading -------------------------------------------------------------------------

def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a model package, validated, without loading its tensors."""
    manifest = read_metadata(path)
    validate_manifest(manifest, path)
    return manifest


def read_package(path: str | os.PathLike) -> tuple[Path, dict]:
    """A package of either kind (a file, or a zoo model's name): its path and its manifest, validated as
    its format says, read once."""
    path = resolve_model(path)
    manifest = read_metadata(path)
    (validate_router if is_router(manifest) else validate_manifest)(manifest, path)
    return path, manifest


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
    """The manifest's architecture, its tensors allocated but not drawn (the file's fill them all: the caller
    loads them strictly; drawing M2CD-ConvNeXt-T's random weights took a second), built once its tensors are known
    to have the names and ``shapes`` of the file ``where``: the architecture is first built on the meta device,
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
    with torch.device("meta"):
        model = factory(**kwargs)
    return model.to_empty(device="cpu")


def _under(prefix: str, mapping: dict) -> dict:
    """The entries of ``mapping`` whose names start with ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}


def _load_members(path: Path, members: list[tuple[str, dict, str | Path]], device) -> list[ModelPackage]:
    """The models a file stores under each ``(tensor name prefix, manifest, where)`` of ``members``, in
    eval mode on ``device``; every member is checked against the header before any tensor is read."""
    shapes = read_shapes(path)
    built = [build_checked_model(manifest, _under(prefix, shapes), where) for prefix, manifest, where in members]
    tensors = read_tensors(path)
    packages = []
    for (prefix, manifest, _), model in zip(members, built):
        model.load_state_dict(_under(prefix, tensors))
        packages.append(ModelPackage(model=model.eval().to(device), manifest=manifest, path=path))
    return packages


def _load_model_package(path: Path, manifest: dict, device) -> ModelPackage:
    return _load_members(path, [("", manifest, path)], device)[0]


def _load_router_package(path: Path, manifest: dict, device) -> RouterPackage:
    roles = [("original", manifest["original"])] + [(f"teacher {t['name']}", t) for t in manifest["teachers"]]
    original, *teachers = _load_members(
        path, [(entry["prefix"], entry["manifest"], f"{path} [{printable(role)}]") for role, entry in roles], device)
    names = [t["name"] for t in manifest["teachers"]]
    for name, teacher in zip(names, teachers):
        if [s["bands"] for s in teacher.manifest["inputs"].values()] != \
                [s["bands"] for s in original.manifest["inputs"].values()]:
            raise PackageError(f"{path}: teacher {printable(name)} reads other bands than the original model")
    return RouterPackage(original, list(zip(names, teachers)), list(manifest["thresholds"]), manifest, path)


def load_package(path: str | os.PathLike, device: str | torch.device = "cpu") -> ModelPackage:
    """Load a model package (a file, or a zoo model's name): the model (eval mode, on ``device``) and its
    manifest."""
    path = resolve_model(path)
    return _load_model_package(path, read_manifest(path), device)


def load_router(path: str | os.PathLike, device: str | torch.device = "cpu") -> RouterPackage:
    """M_O, the teachers and the thresholds of a router package, every model in eval mode."""
    path = resolve_model(path)
    manifest = read_metadata(path)
    validate_router(manifest, path)
    return _load_router_package(path, manifest, device)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> ModelPackage | RouterPackage:
    """A model package or a router package (a file, or a zoo model's name), as its manifest's format says."""
    path, manifest = read_package(path)
    load = _load_router_package if is_router(manifest) else _load_model_package
    return load(path, manifest, device)


# --- Saving --------------------------------------------------------------------------------------

def _state_tensors(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; contiguous clones keep the file self-contained.
    return {prefix + k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def save_package(model: torch.nn.Module, manifest: dict, path: str | os.PathLike) -> Path:
    """Write ``model``'s state and ``manifest`` to ``path`` atomically."""
    validate_manifest(manifest, path)
    return write_package(_state_tensors(model), manifest, path)


def save_router(path: str | os.PathLike, original: str | os.PathLike, teachers: list[tuple[str, str | os.PathLike]],
                thresholds) -> Path:
    """Write a router package from member model packages (M_O, then one teacher per partition)."""
    if len(teachers) != len(thresholds) + 1:
        raise ValueError(f"{len(thresholds)} threshold(s) need {len(thresholds) + 1} teachers, got {len(teachers)}")
    tensors, entries = {}, []
    for i, (name, member) in enumerate([("original", original), *teachers]):
        package = load_package(member)
        prefix = "original." if i == 0 else f"teacher.{name}."
        tensors.update(_state_tensors(package.model, prefix))
        entry = {"prefix": prefix, "manifest": package.manifest}
        if i:
            entry = {"name": name, "max_car": thresholds[i - 1] if i <= len(thresholds) else None, **entry}
        entries.append(entry)
    manifest = {"format": ROUTER_FORMAT, "format_version": ROUTER_FORMAT_VERSION, "thresholds": list(thresholds),
                "comparison": "<=", "original": entries[0], "teachers": entries[1:]}
    return write_package(tensors, manifest, path)


# --- Describing ----------------------------------------------------------------------------------

def describe_model(path) -> dict:
    """What a model package or an O-P router package holds, without loading its tensors: the manifest,
    a readable text, the architecture (with the registry's description and published figures) and the
    default threshold. A router is described by its original model (M_O) and lists its teachers."""
    path, manifest = read_package(path)
    if is_router(manifest):
        lead = manifest["original"]["manifest"]
        text = format_router(manifest)
        architecture = f"O-P router of {lead['architecture']} with {len(manifest['teachers'])} teachers"
    else:
        lead, text, architecture = manifest, format_manifest(manifest), manifest["architecture"]
    try:
        spec = models.spec(lead["architecture"])
        registry = {"description": spec.description, "paper": spec.paper}
    except KeyError:  # an architecture this engine does not know
        registry = {}
    return {"manifest": manifest, "text": text, "architecture": architecture, "registry": registry,
            "threshold": float(lead["output"].get("threshold", 0.5))}
