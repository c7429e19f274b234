"""The model zoo: packages this project trained, shipped in ``zoo/`` beside the engine and chosen by name.

``zoo/index.json`` records each package's file name, size and sha256, so that a changed or truncated file is
caught before it is used. What a zoo model is (task, inputs, data, test metrics, licence, recipe) lives in
its own manifest, as in any package.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from geochange.engine.errors import PackageError

ZOO = Path(__file__).resolve().parents[1] / "zoo"
INDEX = "index.json"


def zoo_index(zoo: Path = ZOO) -> dict[str, dict]:
    """Name -> ``{"file", "bytes", "sha256"}`` of every zoo model (empty without a zoo)."""
    path = zoo / INDEX
    return json.loads(path.read_text()) if path.is_file() else {}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def zoo_path(name: str, zoo: Path = ZOO) -> Path:
    """The package of zoo model ``name``, checked against its recorded size and sha256."""
    index = zoo_index(zoo)
    if name not in index:
        raise PackageError(f"{name}: no zoo model of this name (the zoo has: {', '.join(index) or 'none'})")
    record, path = index[name], zoo / index[name]["file"]
    if not path.is_file() or path.stat().st_size != record["bytes"] or sha256(path) != record["sha256"]:
        raise PackageError(f"{path}: zoo model {name} does not match its record in {zoo / INDEX} "
                           "(missing, changed or cut short)")
    return path


def resolve_model(model: str | os.PathLike) -> Path:
    """A model given as a file, or as the name of a zoo model. A zoo model's name means that model, checked against its
    record, even where the current folder holds a file or folder so named (a folder named after the model's outputs, a
    file planted there): ``./NAME`` names such a file. A file comes back absolute, so that resolving it again (as
    loaders do) gives it again, not the zoo model of its bare name."""
    text, path = os.fspath(model), Path(model)
    named = not any(separator in text for separator in ("/", os.sep)) and path.suffix != ".safetensors"
    index = zoo_index() if named else {}
    if text in index:
        return zoo_path(text)
    if path.exists():  # a folder too: the package loader names it
        return path.absolute()
    if not named:
        raise PackageError(f"{model}: no such model file")
    raise PackageError(f"{model}: no such model file, nor a zoo model's name (`geochange zoo` lists "
                       f"{', '.join(index) if index else 'none yet'})")


def describe_zoo(zoo: Path = ZOO) -> list[dict]:
    """Each zoo model as ``geochange zoo`` lists it: what it is for, its inputs, data, test figures,
    licence, file and recipe, read from its manifest (no tensor is loaded)."""
    from geochange.engine.package import read_manifest

    out = []
    for name in zoo_index(zoo):
        path = zoo_path(name, zoo)
        manifest = read_manifest(path)
        training = manifest.get("training", {})
        test = training.get("metrics", {}).get("test") or {}
        config = training.get("config", {})
        out.append({
            "name": name, "architecture": manifest["architecture"], "task": manifest.get("task", ""),
            "inputs": {date: {"bands": spec["bands"], "modality": spec["modality"], "dtype": spec.get("dtype", "uint8")}
                       for date, spec in sorted(manifest["inputs"].items(), reverse=True)},  # pre, post
            "data": training.get("data", {}),
            "test": {k: test["global"][k] for k in ("f1", "iou", "mIoU", "oa")} if test else None,
            "tta": test.get("tta"), "licence": manifest.get("licence", ""),
            "file": str(path), "bytes": path.stat().st_size, "sha256": zoo_index(zoo)[name]["sha256"],
            "recipe": {"config": config.get("name"), **training.get("recipe", {}),
                       "iterations": training.get("iteration"), "precision": training.get("precision")},
        })
    return out


def format_zoo(entries: list[dict]) -> str:
    """``describe_zoo``'s entries as text; control characters from manifests shown escaped."""
    from geochange.engine.manifest import printable

    if not entries:
        return f"the zoo is empty ({ZOO})"
    blocks = []
    for e in entries:
        inputs = "; ".join(f"{date} {s['bands']}-band {s['modality']} {s['dtype']}" for date, s in e["inputs"].items())
        data = e["data"]
        test = ("  ".join(f"{k} {v:.4f}" for k, v in e["test"].items()) + (" (TTA)" if e["tta"] else "")
                if e["test"] else "not tested")
        recipe = e["recipe"]
        blocks.append("\n".join([
            f"{e['name']}  ({e['architecture']}) {e['task']}",
            f"  inputs   {inputs}",
            f"  data     {', '.join(data.get('datasets', []))}: " + ", ".join(
                f"{data[s]} {s}" for s in ("train", "val", "test") if s in data),
            f"  test     {test}",
            f"  licence  {e['licence']}",
            f"  file     {e['file']}, {e['bytes'] / 1e6:.1f} MB, sha256 {e['sha256']}",
            f"  recipe   config {recipe.get('config')}, {recipe.get('iterations')} iterations, commit "
            f"{recipe.get('commit', 'not recorded')}, command: {recipe.get('command', 'not recorded')}",
        ]))
    return "\n\n".join("\n".join(printable(line) for line in block.splitlines()) for block in blocks)
