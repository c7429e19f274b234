"""Turn foreign checkpoints into GeoChange packages through explicit, strict key maps.

A foreign ``.pth`` is read with ``torch.load(weights_only=True)``, which refuses arbitrary pickled
objects. Every source tensor must map to exactly one model tensor of the same shape and every model
tensor must be filled; otherwise the import is refused with the offending keys listed.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from geochange.engine import models
from geochange.engine.errors import GeoChangeError
from geochange.engine.manifest import make_manifest
from geochange.engine.package import save_package


class WeightsImportError(GeoChangeError, ValueError):
    """A foreign checkpoint does not fit the architecture it is imported as."""


def _mlp(prefix_src: str, prefix_dst: str) -> list[tuple[str, str]]:
    """The authors' PixelwiseLinear (``_linears.i.{0,1}``) onto a flat Sequential (``2i``, ``2i+1``)."""
    return [(rf"{prefix_src}\._linears\.(\d)\.([01])\.(.+)",
             lambda m, d=prefix_dst: f"{d}.{2 * int(m[1]) + int(m[2])}.{m[3]}")]


# (source regex, target template or function of the match); torchvision EfficientNet -> timm names.
_TINYCD_RULES = [
    (r"_backbone\.0\.([01])\.(.+)", r"stem.\1.\2"),
    # Stage 0: depthwise-separable blocks (no expansion).
    (r"_backbone\.1\.(\d)\.block\.0\.0\.(.+)", r"stages.0.\1.conv_dw.\2"),
    (r"_backbone\.1\.(\d)\.block\.0\.1\.(.+)", r"stages.0.\1.bn1.\2"),
    (r"_backbone\.1\.(\d)\.block\.1\.fc1\.(.+)", r"stages.0.\1.se.conv_reduce.\2"),
    (r"_backbone\.1\.(\d)\.block\.1\.fc2\.(.+)", r"stages.0.\1.se.conv_expand.\2"),
    (r"_backbone\.1\.(\d)\.block\.2\.0\.(.+)", r"stages.0.\1.conv_pw.\2"),
    (r"_backbone\.1\.(\d)\.block\.2\.1\.(.+)", r"stages.0.\1.bn2.\2"),
    # Stages 1-2: inverted residual blocks (expand, depthwise, SE, project).
    (r"_backbone\.([23])\.(\d)\.block\.0\.0\.(.+)", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.conv_pw.{m[3]}"),
    (r"_backbone\.([23])\.(\d)\.block\.0\.1\.(.+)", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.bn1.{m[3]}"),
    (r"_backbone\.([23])\.(\d)\.block\.1\.0\.(.+)", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.conv_dw.{m[3]}"),
    (r"_backbone\.([23])\.(\d)\.block\.1\.1\.(.+)", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.bn2.{m[3]}"),
    (r"_backbone\.([23])\.(\d)\.block\.2\.fc1\.(.+)",
     lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.se.conv_reduce.{m[3]}"),
    (r"_backbone\.([23])\.(\d)\.block\.2\.fc2\.(.+)",
     lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.se.conv_expand.{m[3]}"),
    (r"_backbone\.([23])\.(\d)\.block\.3\.0\.(.+)", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.conv_pwl.{m[3]}"),
    (r"_backbone\.([23])\.(\d)\.block\.3\.1\.(.+)", lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.bn3.{m[3]}"),
    # Mixing blocks.
    (r"_first_mix\._mixing\._convmix\.0\.(.+)", r"first_mix.mix.conv.\1"),
    (r"_first_mix\._mixing\._convmix\.1\.(.+)", r"first_mix.mix.act.\1"),
    *_mlp(r"_first_mix\._linear", "first_mix.mlp"),
    (r"_mixing_mask\.([01])\._mixing\._convmix\.0\.(.+)", r"mixers.\1.mix.conv.\2"),
    (r"_mixing_mask\.([01])\._mixing\._convmix\.1\.(.+)", r"mixers.\1.mix.act.\2"),
    (r"_mixing_mask\.([01])\._linear\._linears\.(\d)\.([01])\.(.+)",
     lambda m: f"mixers.{m[1]}.mlp.{2 * int(m[2]) + int(m[3])}.{m[4]}"),
    # The LEVIR file stores the deepest mixer as ``_mixing_mask.2._convmix``, the later WHU file as
    # ``_mixing_mask.2._mixing._convmix``: both are the same block.
    (r"_mixing_mask\.2\.(?:_mixing\.)?_convmix\.0\.(.+)", r"deep_mix.conv.\1"),
    (r"_mixing_mask\.2\.(?:_mixing\.)?_convmix\.1\.(.+)", r"deep_mix.act.\1"),
    (r"_up\.(\d)\._convolution\.([0134])\.(.+)", r"ups.\1.conv.\2.\3"),
    *_mlp(r"_classify", "classifier"),
]

FORMATS = {
    "tinycd": {
        "architecture": "tinycd",
        "rules": _TINYCD_RULES,
        "tile": 256,  # LEVIR-CD and WHU-CD cut into 256 px crops, as the authors train and test
        "training": {"dataset": "LEVIR-CD", "method": "plain",
                     "metrics": {"f1_change_global_levir_test_published": 0.9105,
                                 "iou_change_global_levir_test_published": 0.8357}},
        "source": "TinyCD authors' released weights (AndreaCodegoni/Tiny_model_4_CD, pretrained_models/)",
        "licence": "the authors' release terms (research / non-commercial use)",
    },
}


def _map_key(key: str, rules) -> str | None:
    for pattern, target in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return target(m) if callable(target) else m.expand(target)
    return None


def map_state_dict(source: dict, rules, model: torch.nn.Module) -> dict:
    """Rename ``source`` onto ``model``'s keys; refuse unknown, missing or mis-shaped tensors."""
    expected = model.state_dict()
    mapped, unknown, wrong_shape = {}, [], []
    for key, tensor in source.items():
        target = _map_key(key, rules)
        if target is None or target not in expected:
            unknown.append(key)
        elif tuple(tensor.shape) != tuple(expected[target].shape):
            wrong_shape.append(f"{key} {tuple(tensor.shape)} -> {target} {tuple(expected[target].shape)}")
        elif target in mapped:
            unknown.append(f"{key} (a second tensor for {target})")
        else:
            mapped[target] = tensor
    missing = sorted(set(expected) - set(mapped))
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s): {', '.join(unknown[:10])}")
    if missing:
        problems.append(f"{len(missing)} missing key(s): {', '.join(missing[:10])}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es): {'; '.join(wrong_shape[:10])}")
    if problems:
        raise WeightsImportError("checkpoint does not fit: " + " | ".join(problems))
    return mapped


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A foreign ``state_dict`` (optionally wrapped in ``state_dict``/``model``), tensors only."""
    path = Path(path)
    if not path.is_file():
        raise WeightsImportError(f"{path}: no such checkpoint")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False, which could run the file
        raise WeightsImportError(f"{path}: cannot be read as a tensor checkpoint: not a torch.save file, or "
                                 "one holding Python objects besides tensors, which are never unpickled") from None
    except Exception as e:  # torch raises several types for truncated or non-tensor pickles
        raise WeightsImportError(f"{path}: cannot be read as a tensor checkpoint ({type(e).__name__}: "
                                 f"{(str(e).splitlines() or [type(e).__name__])[0]})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsImportError(f"{path}: not a state_dict of tensors")
    return obj


def import_weights(fmt: str, source: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Convert a foreign checkpoint of format ``fmt`` into a package at ``destination``."""
    if fmt not in FORMATS:
        raise WeightsImportError(f"unknown format {fmt!r}; known: {', '.join(sorted(FORMATS))}")
    info = FORMATS[fmt]
    model = models.create(info["architecture"])
    checkpoint = read_checkpoint(source)  # its errors name the file
    try:
        state = map_state_dict(checkpoint, info["rules"], model)
    except WeightsImportError as e:
        raise WeightsImportError(f"{source}: {e}") from None
    model.load_state_dict(state, strict=True)
    manifest = make_manifest(info["architecture"], tile=info["tile"], training=info["training"],
                             licence=info["licence"], source=f"{info['source']}: {Path(source).name}")
    return save_package(model, manifest, destination)
