"""ImageNet weights for timm backbones from local files, through explicit key maps (read and mapped by
``engine.checkpoints``, as ``import-weights`` reads and maps the authors' checkpoints).

Accepted files (tensors only, no pickled code), bare or under a ``state_dict`` / ``model`` entry:

* a timm state dict of the same architecture (``pvt_v2_*`` built with MiT's MLP ratio 4, ``convnext_*``);
* for MiT, the two forms its ImageNet weights circulate in: SegFormer's release (``patch_embed1.proj``,
  ``block1.0.attn.q`` / ``attn.kv`` / ``attn.sr`` / ``attn.norm``, ``block1.0.mlp.dwconv.dwconv``,
  ``norm1`` ...) and mmsegmentation's conversion of it, which Open-CD loads (``mit_b0_20220624-7e0fe6dd.pth``:
  ``layers.0.0.projection``, ``layers.0.1.0.attn.attn.in_proj_weight`` holding q, k and v,
  ``layers.0.1.0.ffn.layers.0/1/4`` as 1x1 / depthwise / 1x1 convs, ``layers.0.2`` ...);
* for EfficientNet (TinyCD's first layers), torchvision's state dict (``features.0.0``, ``features.1.0.block.0.0``
  ...), from which TinyCD's authors start.

A classifier (``head.*``) is dropped. Keys the map does not know, keys the backbone needs but the file
lacks, and shapes that differ are all listed in one error and nothing is loaded. A stem built for another
number of input bands gets the file's RGB kernel adapted by timm's ``adapt_input_conv``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn
from timm.models import adapt_input_conv

from geochange.engine.checkpoints import Rule, map_state_dict, read_checkpoint

# First convolution of the supported backbones (timm names): the one that sees the input bands.
_STEM_WEIGHTS = ("patch_embed.proj.weight", "stem.0.weight", "conv_stem.weight")


def _to(template: str, stage_shift: int, pointwise: bool = False):
    """A rule target: ``template`` formatted with the stage number (group 1) + ``stage_shift`` as
    ``{0}``, then the other groups. ``pointwise``: a 1x1 convolution of mmseg's Mix-FFN, which is a
    linear layer in SegFormer."""
    def apply(m: re.Match, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if pointwise and value.dim() == 4:
            value = value.flatten(1)
        return [(template.format(int(m[1]) + stage_shift, *m.groups()[1:]), value)]
    return apply


# SegFormer's MiT names -> timm's PVT-v2 names (stages 1-4 become 0-3).
_BLOCK_PARTS = r"(norm1|norm2|attn\.q|attn\.kv|attn\.proj|attn\.sr|attn\.norm|mlp\.fc1|mlp\.fc2)"
_SEGFORMER_RULES: list[Rule] = [
    (r"patch_embed(1)\.(proj|norm)\.(weight|bias)", _to("patch_embed.{1}.{2}", -1)),
    (r"patch_embed([2-4])\.(proj|norm)\.(weight|bias)", _to("stages.{0}.downsample.{1}.{2}", -1)),
    (rf"block([1-4])\.(\d+)\.{_BLOCK_PARTS}\.(weight|bias)", _to("stages.{0}.blocks.{1}.{2}.{3}", -1)),
    (r"block([1-4])\.(\d+)\.mlp\.dwconv\.dwconv\.(weight|bias)",
     _to("stages.{0}.blocks.{1}.mlp.dwconv.{2}", -1)),
    (r"norm([1-4])\.(weight|bias)", _to("stages.{0}.norm.{1}", -1)),
]


def _split_in_proj(m: re.Match, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    # nn.MultiheadAttention stacks q, k, v; SegFormer / timm keep q apart and k, v together.
    q, kv = value.split([value.shape[0] // 3, 2 * value.shape[0] // 3])
    prefix = f"block{int(m[1]) + 1}.{m[2]}.attn"
    return [(f"{prefix}.q.{m[3]}", q), (f"{prefix}.kv.{m[3]}", kv)]


# mmsegmentation's MiT names -> SegFormer's (the inverse of mmseg's mit2mmseg converter; stages 0-3
# become 1-4), to which the SegFormer rules then apply.
_MMSEG_RULES: list[Rule] = [
    (r"layers\.(\d)\.0\.projection\.(weight|bias)", _to("patch_embed{0}.proj.{1}", 1)),
    (r"layers\.(\d)\.0\.norm\.(weight|bias)", _to("patch_embed{0}.norm.{1}", 1)),
    (r"layers\.(\d)\.1\.(\d+)\.(norm1|norm2|attn\.sr|attn\.norm)\.(weight|bias)",
     _to("block{0}.{1}.{2}.{3}", 1)),
    (r"layers\.(\d)\.1\.(\d+)\.attn\.attn\.in_proj_(weight|bias)", _split_in_proj),
    (r"layers\.(\d)\.1\.(\d+)\.attn\.attn\.out_proj\.(weight|bias)", _to("block{0}.{1}.attn.proj.{2}", 1)),
    (r"layers\.(\d)\.1\.(\d+)\.ffn\.layers\.0\.(weight|bias)", _to("block{0}.{1}.mlp.fc1.{2}", 1, True)),
    (r"layers\.(\d)\.1\.(\d+)\.ffn\.layers\.1\.(weight|bias)", _to("block{0}.{1}.mlp.dwconv.dwconv.{2}", 1)),
    (r"layers\.(\d)\.1\.(\d+)\.ffn\.layers\.4\.(weight|bias)", _to("block{0}.{1}.mlp.fc2.{2}", 1, True)),
    (r"layers\.(\d)\.2\.(weight|bias)", _to("norm{0}.{1}", 1)),
]


# torchvision's EfficientNet names -> timm's: the parts of a block, for stage 0's depthwise-separable blocks
# (no expansion) and the later stages' inverted residual blocks (expand, depthwise, SE, project).
_SEPARABLE_PARTS = {"0.0": "conv_dw", "0.1": "bn1", "1.fc1": "se.conv_reduce", "1.fc2": "se.conv_expand",
                    "2.0": "conv_pw", "2.1": "bn2"}
_INVERTED_PARTS = {"0.0": "conv_pw", "0.1": "bn1", "1.0": "conv_dw", "1.1": "bn2", "2.fc1": "se.conv_reduce",
                   "2.fc2": "se.conv_expand", "3.0": "conv_pwl", "3.1": "bn3"}


def efficientnet_rules(prefix: str, stem: tuple[str, str], blocks: str) -> list[Rule]:
    """torchvision's EfficientNet stem and stages (``<prefix>.0`` to ``<prefix>.7``) -> timm's layout, the stem's
    conv and norm named ``stem``, the stages' list ``blocks``."""
    p = re.escape(prefix)
    return [(rf"{p}\.0\.0\.(.+)", rf"{stem[0]}.\1"),
            (rf"{p}\.0\.1\.(.+)", rf"{stem[1]}.\1"),
            *[(rf"{p}\.1\.(\d+)\.block\.{re.escape(part)}\.(.+)", rf"{blocks}.0.\1.{ours}.\2")
              for part, ours in _SEPARABLE_PARTS.items()],
            *[(rf"{p}\.([2-7])\.(\d+)\.block\.{re.escape(part)}\.(.+)", _to(f"{blocks}.{{0}}.{{1}}.{ours}.{{2}}", -1))
              for part, ours in _INVERTED_PARTS.items()]]


_TORCHVISION_EFFICIENTNET_RULES: list[Rule] = [
    *efficientnet_rules("features", ("conv_stem", "bn1"), "blocks"),
    (r"features\.8\.0\.(.+)", r"conv_head.\1"),
    (r"features\.8\.1\.(.+)", r"bn2.\1"),
    (r"classifier\.1\.(.+)", r"classifier.\1"),
]


def _layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith("layers.") for k in keys):
        return "mmseg"
    if any(k.startswith("features.") for k in keys):
        return "torchvision"
    if any(re.match(r"(patch_embed|block)1\.", k) for k in keys):
        return "segformer"
    return "timm"


def _adapt_stem(key: str, value: torch.Tensor, own: torch.Tensor) -> torch.Tensor | None:
    """The file's RGB stem kernel for a stem built for another number of bands (timm's adaptation)."""
    if (key in _STEM_WEIGHTS and own.dim() == 4 and value.shape[0] == own.shape[0]
            and value.shape[2:] == own.shape[2:]):
        return adapt_input_conv(own.shape[1], value.float()).to(value.dtype)
    return None


def load_backbone_weights(backbone: nn.Module, path: str | Path, *, unused_prefixes: Iterable[str] = (),
                          new_prefixes: Iterable[str] = ()) -> dict:
    """Load the weights in ``path`` into ``backbone`` (a timm model, classifier removed), all or nothing.

    ``unused_prefixes``: file keys (timm names) the model deliberately has no use for, e.g. the dense MLP
    of a block whose MLP a model replaced; ``new_prefixes``: the model's own keys the file cannot have,
    which keep their initialisation. Returns what was done: ``format``, ``loaded``, ``dropped`` (file
    keys), ``kept_initial`` (model keys), ``adapted`` (stem kernels adapted to the input bands).
    """
    raw = read_checkpoint(path)
    fmt = _layout(raw)
    classifier = sorted(k for k in raw if k.startswith("head."))
    # mmseg's names go to SegFormer's first, then SegFormer's to timm's.
    passes = {"mmseg": (_MMSEG_RULES, _SEGFORMER_RULES), "segformer": (_SEGFORMER_RULES,),
              "torchvision": (_TORCHVISION_EFFICIENTNET_RULES,), "timm": ()}[fmt]
    own = backbone.state_dict()
    new_prefixes = tuple(new_prefixes)
    kept = [k for k in own if k.startswith(new_prefixes)]
    mapped = map_state_dict({k: v for k, v in raw.items() if not k.startswith("head.")},
                            {k: v for k, v in own.items() if not k.startswith(new_prefixes)}, *passes,
                            origin=f"{path} ({fmt} format)", target=type(backbone).__name__,
                            unused=unused_prefixes, adapt=_adapt_stem)
    backbone.load_state_dict({**{k: own[k] for k in kept}, **mapped.state}, strict=True)
    return {"format": fmt, "loaded": list(mapped.state), "dropped": classifier + mapped.dropped,
            "kept_initial": kept, "adapted": mapped.adapted}
