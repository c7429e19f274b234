"""Router packages and O-P inference (the MTKD paper's original-model partitioning).

A router package is one self-contained ``.safetensors`` file: the tensors of the original model M_O
under ``original.`` and of each teacher under ``teacher.<name>.``, and in the header metadata (key
``geochange``) the manifest ``{"format": "geochange-router", "format_version": 1, "thresholds": [...],
"comparison": "<=", "original": {"prefix", "manifest"}, "teachers": [{"name", "max_car", "prefix",
"manifest"}, ...]}``, each ``manifest`` being the member's model-package manifest.

O-P inference, window by window: M_O predicts; the changed share of its binary prediction is the
window's change-area ratio (CAR); the first teacher whose ``max_car`` is >= CAR (the authors' test
code compares with <=), else the last one, gives the window's prediction. Blending is as usual.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geochange.engine import models
from geochange.engine.package import (ModelPackage, PackageError, build_checked_model, format_manifest, is_number,
                                      load_package, need, printable, read_manifest, read_metadata, read_shapes,
                                      read_tensors, validate_manifest, write_package)
from geochange.engine.zoo import resolve_model

ROUTER_FORMAT = "geochange-router"


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


def change_area_ratio(changed, valid) -> torch.Tensor:
    """CAR: changed pixels over valid pixels, per sample over the last two axes (0 where none is valid)."""
    changed, valid = torch.as_tensor(changed), torch.as_tensor(valid)
    return (changed & valid).flatten(-2).sum(-1).double() / valid.flatten(-2).sum(-1).clamp(min=1).double()


def route(car: torch.Tensor, thresholds, inclusive: bool = False) -> torch.Tensor:
    """Partition index of each CAR: the first threshold above it (training: CAR < t), or at or above
    it with ``inclusive`` (O-P inference: CAR <= t); past the last threshold, the last partition."""
    # Thresholds in the CAR's own precision: a float32 CAR of exactly 0.05 equals float32 0.05.
    bounds = torch.tensor(list(thresholds), dtype=car.dtype, device=car.device)
    return torch.bucketize(car, bounds, right=not inclusive)


def save_router(path: str | os.PathLike, original: str | os.PathLike, teachers: list[tuple[str, str | os.PathLike]],
                thresholds) -> Path:
    """Write a router package from member model packages (M_O, then one teacher per partition)."""
    if len(teachers) != len(thresholds) + 1:
        raise ValueError(f"{len(thresholds)} threshold(s) need {len(thresholds) + 1} teachers, got {len(teachers)}")
    tensors, entries = {}, []
    for i, (name, member) in enumerate([("original", original), *teachers]):
        package = load_package(member)
        prefix = "original." if i == 0 else f"teacher.{name}."
        tensors.update({prefix + k: v.detach().cpu().contiguous().clone()
                        for k, v in package.model.state_dict().items()})
        entry = {"prefix": prefix, "manifest": package.manifest}
        if i:
            entry = {"name": name, "max_car": thresholds[i - 1] if i <= len(thresholds) else None, **entry}
        entries.append(entry)
    manifest = {"format": ROUTER_FORMAT, "format_version": 1, "thresholds": list(thresholds),
                "comparison": "<=", "original": entries[0], "teachers": entries[1:]}
    return write_package(tensors, manifest, path)


def validate_router(manifest, path) -> None:
    """Check every field of a router manifest, each member's manifest included (``validate_manifest``)."""
    if not (isinstance(manifest, dict) and manifest.get("format") == ROUTER_FORMAT):
        raise PackageError(f"{path}: not a router package (format "
                           f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    need(manifest.get("format_version") == 1, path, "format_version", "1 (the version this engine reads)",
         manifest.get("format_version"))
    thresholds = manifest.get("thresholds")
    need(isinstance(thresholds, list) and all(is_number(t) and 0 <= t <= 1 for t in thresholds)
         and thresholds == sorted(thresholds), path, "thresholds", "increasing CAR thresholds in [0, 1]", thresholds)
    teachers = manifest.get("teachers")
    need(isinstance(teachers, list) and len(teachers) == len(thresholds) + 1, path, "teachers",
         f"a list of {len(thresholds) + 1} teachers (one more than the thresholds)", teachers)
    members = [("original", manifest.get("original"))] + [(f"teachers[{i}]", t) for i, t in enumerate(teachers)]
    for field, entry in members:
        need(isinstance(entry, dict) and isinstance(entry.get("prefix"), str), path, field,
             "an object with a tensor name prefix", entry)
        if field != "original":
            need(isinstance(entry.get("name"), str), path, f"{field}.name", "a name", entry.get("name"))
            need(entry.get("max_car") is None or is_number(entry["max_car"]), path, f"{field}.max_car",
                 "a number or null", entry.get("max_car"))
        validate_manifest(entry.get("manifest"), f"{path} [{field}]")


def _under(prefix: str, mapping: dict) -> dict:
    """The entries of ``mapping`` whose names start with ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}


def load_router(path: str | os.PathLike, device: str | torch.device = "cpu") -> RouterPackage:
    """M_O, the teachers and the thresholds of a router package, every model in eval mode."""
    path = Path(path)
    manifest = read_metadata(path)
    validate_router(manifest, path)
    entries = [("original", manifest["original"])] + [(f"teacher {t['name']}", t) for t in manifest["teachers"]]
    shapes = read_shapes(path)
    # Every member checked against the header before any tensor is read.
    built = [build_checked_model(entry["manifest"], _under(entry["prefix"], shapes), f"{path} [{printable(role)}]")
             for role, entry in entries]
    tensors = read_tensors(path)
    members = []
    for (_, entry), model in zip(entries, built):
        model.load_state_dict(_under(entry["prefix"], tensors))
        members.append(ModelPackage(model=model.eval().to(device), manifest=entry["manifest"], path=path))
    original = members[0]
    teachers = [(t["name"], package) for t, package in zip(manifest["teachers"], members[1:])]
    for name, teacher in teachers:
        if [s["bands"] for s in teacher.manifest["inputs"].values()] != \
                [s["bands"] for s in original.manifest["inputs"].values()]:
            raise PackageError(f"{path}: teacher {printable(name)} reads other bands than the original model")
    return RouterPackage(original, teachers, list(manifest["thresholds"]), manifest, path)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> ModelPackage | RouterPackage:
    """A model package or a router package (a file, or a zoo model's name), told apart by the manifest's
    format."""
    path = resolve_model(path)
    manifest = read_metadata(path)
    if isinstance(manifest, dict) and manifest.get("format") == ROUTER_FORMAT:
        return load_router(path, device)
    return load_package(path, device)


def describe_model(path) -> dict:
    """What a model package or an O-P router package holds, without loading its tensors: the manifest,
    a readable text, the architecture (with the registry's description and published figures) and the
    default threshold. A router is described by its original model (M_O) and lists its teachers."""
    path = resolve_model(path)
    header = read_metadata(path)
    if isinstance(header, dict) and header.get("format") == ROUTER_FORMAT:
        validate_router(header, path)
        manifest, lead = header, header["original"]["manifest"]
        members = [("original", header["original"])] + [
            (f"teacher {printable(t['name'])} (CAR <= {t['max_car']})", t) for t in header["teachers"]]
        text = f"O-P router: CAR thresholds {header['thresholds']} (CAR <= threshold picks the teacher)" + "".join(
            f"\n[{role}]\n{format_manifest(entry['manifest'])}" for role, entry in members)
        architecture = f"O-P router of {lead['architecture']} with {len(header['teachers'])} teachers"
    else:
        manifest = lead = read_manifest(path)
        text, architecture = format_manifest(manifest), manifest["architecture"]
    try:
        spec = models.spec(lead["architecture"])
        registry = {"description": spec.description, "paper": spec.paper}
    except KeyError:  # an architecture this engine does not know
        registry = {}
    return {"manifest": manifest, "text": text, "architecture": architecture, "registry": registry,
            "threshold": float(lead["output"].get("threshold", 0.5))}


class RouterPredictor:
    """O-P inference over a batch of windows, with the interface of ``Predictor``."""

    def __init__(self, router: RouterPackage, make_predictor):
        self.router = router
        self.original = make_predictor(router.original)
        self.teachers = [make_predictor(package) for _, package in router.teachers]
        self.device = self.original.device
        self.routed = np.zeros(len(self.teachers), np.int64)  # windows per teacher, for the report

    def __call__(self, pre: np.ndarray, post: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """As ``Predictor``; a window's change-area ratio counts its ``valid`` pixels only (all if None)."""
        first = self.original(pre, post)
        changed = first > self.router.threshold
        car = change_area_ratio(changed, np.ones_like(changed) if valid is None else valid)
        which = route(car, self.router.thresholds, inclusive=True).numpy()
        out = np.empty_like(first)
        for i, teacher in enumerate(self.teachers):
            index = np.flatnonzero(which == i)
            if len(index):
                out[index] = teacher(pre[index], post[index])
                self.routed[i] += len(index)
        return out
