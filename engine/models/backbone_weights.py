"""ImageNet weights for timm backbones from local files, through explicit key maps.

Accepted files (``torch.load`` with ``weights_only=True``: tensors only, no pickled code), bare or under
a ``state_dict`` / ``model`` entry:

* a timm state dict of the same architecture (``pvt_v2_*`` built with MiT's MLP ratio 4, ``convnext_*``);
* for MiT, the two forms its ImageNet weights circulate in: SegFormer's release (``patch_embed1.proj``,
  ``block1.0.attn.q`` / ``attn.kv`` / ``attn.sr`` / ``attn.norm``, ``block1.0.mlp.dwconv.dwconv``,
  ``norm1`` ...) and mmsegmentation's conversion of it, which Open-CD loads (``mit_b0_20220624-7e0fe6dd.pth``:
  ``layers.0.0.projection``, ``layers.0.1.0.attn.attn.in_proj_weight`` holding q, k and v,
  ``layers.0.1.0.ffn.layers.0/1/4`` as 1x1 / depthwise / 1x1 convs, ``layers.0.2`` ...).

A classifier (``head.*``) is dropped. Keys the map does not know, keys the backbone needs but the file
lacks, and shapes that differ are all listed in one error and nothing is loaded. A stem built for another
number of input bands gets the file's RGB kernel adapted by timm's ``adapt_input_conv``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
from timm.models import adapt_input_conv

# First convolution of the supported backbones (timm names): the one that sees the input bands.
_STEM_WEIGHTS = ("patch_embed.proj.weight", "stem.0.weight")

Rule = tuple[str, Callable[[re.Match, torch.Tensor], list[tuple[str, torch.Tensor]]]]


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


def _apply_rules(state: dict[str, torch.Tensor], rules: list[Rule],
                 origin: dict[str, str]) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """Rename ``state`` by the first matching rule; returns the renamed dict, the keys no rule knows and
    the new key -> original file key map (``origin`` chains earlier renames)."""
    out, unknown, new_origin = {}, [], {}
    for key, value in state.items():
        for pattern, target in rules:
            m = re.fullmatch(pattern, key)
            if m:
                for name, tensor in target(m, value):
                    out[name] = tensor
                    new_origin[name] = origin.get(key, key)
                break
        else:
            unknown.append(origin.get(key, key))
    return out, unknown, new_origin


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # mmengine / training-script checkpoints
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(wrapper), dict):
            checkpoint = checkpoint[wrapper]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return dict(checkpoint)


def checkpoint_format(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith("layers.") for k in keys):
        return "mmseg"
    if any(re.match(r"(patch_embed|block)1\.", k) for k in keys):
        return "segformer"
    return "timm"


def to_timm_names(state: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], list[str], dict[str, str]]:
    """``state`` (no classifier) in timm's names; also the file keys no rule knows and, for messages,
    each new name's key in the file."""
    fmt = checkpoint_format(state)
    origin: dict[str, str] = {}
    unknown: list[str] = []
    if fmt == "mmseg":
        state, unknown, origin = _apply_rules(state, _MMSEG_RULES, origin)
    if fmt in ("mmseg", "segformer"):
        state, more_unknown, origin = _apply_rules(state, _SEGFORMER_RULES, origin)
        unknown += more_unknown
    return state, unknown, origin


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit]) + (f" ... ({len(items) - limit} more)" if len(items) > limit else "")
    return f"{title} ({len(items)}): {shown}"


def load_backbone_weights(backbone: nn.Module, path: str | Path, *, unused_prefixes: Iterable[str] = (),
                          new_prefixes: Iterable[str] = ()) -> dict:
    """Load the weights in ``path`` into ``backbone`` (a timm model, classifier removed), all or nothing.

    ``unused_prefixes``: file keys (timm names) the model deliberately has no use for, e.g. the dense MLP
    of a block whose MLP a model replaced; ``new_prefixes``: the model's own keys the file cannot have,
    which keep their initialisation. Returns what was done: ``format``, ``loaded``, ``dropped`` (file
    keys), ``kept_initial`` (model keys), ``adapted`` (stem kernels adapted to the input bands).
    """
    raw = read_state_dict(path)
    fmt = checkpoint_format(raw)
    classifier = sorted(k for k in raw if k.startswith("head."))
    state, unknown, origin = to_timm_names({k: v for k, v in raw.items() if not k.startswith("head.")})
    unused_prefixes, new_prefixes = tuple(unused_prefixes), tuple(new_prefixes)
    own = backbone.state_dict()

    dropped = classifier + sorted(origin.get(k, k) for k in state if k.startswith(unused_prefixes))
    state = {k: v for k, v in state.items() if not k.startswith(unused_prefixes)}
    unknown += sorted(origin.get(k, k) for k in state if k not in own)
    expected = [k for k in own if not k.startswith(new_prefixes)]
    missing = [k for k in expected if k not in state]
    mismatched, adapted = [], []
    for key in expected:
        if key not in state or state[key].shape == own[key].shape:
            continue
        file_shape, own_shape = state[key].shape, own[key].shape
        if (key in _STEM_WEIGHTS and len(own_shape) == 4 and file_shape[0] == own_shape[0]
                and file_shape[2:] == own_shape[2:]):
            state[key] = adapt_input_conv(own_shape[1], state[key].float()).to(state[key].dtype)
            adapted.append(key)
        else:
            mismatched.append(f"{origin.get(key, key)} {tuple(file_shape)} -> {key} {tuple(own_shape)}")
    problems = [_listing(title, items) for title, items in
                (("unknown keys", unknown), ("missing keys", missing), ("shape mismatches", mismatched))
                if items]
    if problems:
        raise ValueError(f"backbone weights in {path} ({fmt} format) do not fit "
                         f"{type(backbone).__name__}: " + "; ".join(problems))

    kept = [k for k in own if k.startswith(new_prefixes)]
    backbone.load_state_dict({**{k: own[k] for k in kept}, **{k: state[k] for k in expected}}, strict=True)
    return {"format": fmt, "loaded": expected, "dropped": dropped, "kept_initial": kept, "adapted": adapted}
