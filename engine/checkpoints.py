"""Foreign torch checkpoints (authors' releases, ImageNet backbones): read safely, renamed onto a model.

``read_checkpoint`` loads a ``.pth`` with ``torch.load(weights_only=True)``, which refuses pickled
objects other than tensors, and unwraps a ``state_dict`` / ``model`` entry. ``map_state_dict`` renames
its keys by explicit rules and fits them to the model's tensors all or nothing: keys no rule knows,
tensors the model needs but the file lacks and shapes that differ are listed in one error. The rules of
each model family live beside the model (``models/tinycd.py``, ``models/backbone_weights.py`` for MiT),
as timm keeps a ``checkpoint_filter_fn`` beside each family.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch

from geochange.engine.errors import CheckpointError
from geochange.engine.progress import raise_if_stopped

# (regex over a whole key, target): a template for ``re.Match.expand``, or a function of the match and
# the tensor that returns the (key, tensor) pairs it becomes (a stacked tensor split, a kernel reshaped).
Rule = tuple[str, str | Callable[[re.Match, torch.Tensor], list[tuple[str, torch.Tensor]]]]


def load_tensors(path: Path):
    """``torch.load`` of a file of tensors, never unpickling Python objects; else ``CheckpointError`` saying why
    (the caller names the file and what it expected)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message suggests weights_only=False, which could run the file
        raise CheckpointError("not a torch.save file, or one holding Python objects besides tensors, which are "
                              "never unpickled") from None
    except Exception as e:  # torch raises several types for truncated or non-tensor files
        raise_if_stopped()
        raise CheckpointError(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}") from None


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A foreign ``state_dict``, bare or under ``state_dict`` / ``model`` (mmengine, training scripts)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        obj = load_tensors(path)
    except CheckpointError as why:
        raise CheckpointError(f"{path} is not a checkpoint of tensors ({why})") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a checkpoint of tensors: it holds no state dict of tensors")
    return dict(obj)


@dataclass
class MappedState:
    state: dict[str, torch.Tensor]  # every expected key, in the model's names
    dropped: list[str]  # file keys left out on purpose (``unused``)
    adapted: list[str]  # model keys whose file tensor ``adapt`` reshaped


def _first_match(key: str, rules: Sequence[Rule]) -> tuple[re.Match, object] | None:
    for pattern, target in rules:
        m = re.fullmatch(pattern, key)
        if m:
            return m, target
    return None


def _rename(state: dict, rules: Sequence[Rule], origin: dict[str, str]) -> tuple[dict, list[str], dict[str, str]]:
    """One pass of ``rules`` (the first that matches a key wins): the renamed dict, the file keys no rule
    knows or that land on a key already filled, and each new key's key in the file."""
    out, unknown, new_origin = {}, [], {}
    for key, value in state.items():
        source = origin.get(key, key)
        match = _first_match(key, rules)
        if match is None:
            unknown.append(source)
            continue
        m, target = match
        for name, tensor in ([(m.expand(target), value)] if isinstance(target, str) else target(m, value)):
            if name in out:
                unknown.append(f"{source} (a second tensor for {name})")
            else:
                out[name], new_origin[name] = tensor, source
    return out, unknown, new_origin


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit]) + (f" ... ({len(items) - limit} more)" if len(items) > limit else "")
    return f"{title} ({len(items)}): {shown}"


# adapt(key, file tensor, model tensor): the file tensor made to fit the model's shape, or None.
Adapt = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor | None]


def map_state_dict(source: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                   *passes: Sequence[Rule], origin: str, target: str, unused: Iterable[str] = (),
                   adapt: Adapt | None = None) -> MappedState:
    """``source`` renamed by each pass of rules in turn (none: its keys are the model's already) onto
    ``expected`` (the model's tensors, or their shapes' holders), or ``CheckpointError`` naming every
    problem, which begins with ``origin`` (the file) and names ``target`` (the model).

    ``unused``: prefixes of renamed keys the model deliberately has no use for (reported as dropped).
    ``adapt``: makes a file tensor of another shape fit, where it can (a stem kernel for other bands).
    """
    state, origin_of, unknown = dict(source), {}, []
    for rules in passes:
        state, more, origin_of = _rename(state, rules, origin_of)
        unknown += more
    unused = tuple(unused)
    dropped = sorted(origin_of.get(k, k) for k in state if k.startswith(unused))
    state = {k: v for k, v in state.items() if not k.startswith(unused)}
    unknown += sorted(origin_of.get(k, k) for k in state if k not in expected)
    missing = [k for k in expected if k not in state]
    mismatched, adapted = [], []
    for key, own in expected.items():
        if key not in state or state[key].shape == own.shape:
            continue
        fitted = adapt(key, state[key], own) if adapt else None
        if fitted is None:
            mismatched.append(f"{origin_of.get(key, key)} {tuple(state[key].shape)} -> {key} {tuple(own.shape)}")
        else:
            state[key] = fitted
            adapted.append(key)
    problems = [_listing(title, items) for title, items in
                (("unknown keys", unknown), ("missing keys", missing), ("shape mismatches", mismatched)) if items]
    if problems:
        raise CheckpointError(f"{origin} does not fit {target}: " + "; ".join(problems))
    return MappedState({k: state[k] for k in expected}, dropped, adapted)
