"""Optimiser with Open-CD's per-parameter multipliers, and the learning-rate schedule.

Multipliers follow mmengine's ``paramwise_cfg.custom_keys``: the keys are tried longest first (ties in
alphabetical order) and the first one contained in a parameter's name sets both its learning-rate and
its weight-decay multiplier (1 for what the key does not mention). The authors' MiT configs use
``{head: lr x10, norm: no decay, pos_block: no decay}``; a head parameter whose name also holds ``norm``
therefore keeps its decay, as in their runs.

The schedule is a function of the iteration alone (linear warm-up from ``warmup_start`` x lr, then poly
or cosine decay to 0, or constant), so resuming the iteration resumes the schedule.
"""
from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, lr_mult: dict,
                 decay_mult: dict) -> list[dict]:
    keys = sorted(sorted(set(lr_mult) | set(decay_mult)), key=len, reverse=True)
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = next((k for k in keys if k in name), None)
        mults = (float(lr_mult.get(key, 1.0)), float(decay_mult.get(key, 1.0)))
        groups.setdefault(mults, []).append(param)
    return [{"params": params, "lr": lr * lm, "base_lr": lr * lm, "weight_decay": weight_decay * dm}
            for (lm, dm), params in groups.items()]


def unmatched_multipliers(model: torch.nn.Module, cfg: dict) -> list[str]:
    """What ``optim.lr_mult`` and ``decay_mult`` set that no parameter's name holds (a misspelt key leaves every
    parameter at 1). Not an error: the authors' MiT configs, which ours follow, name ``pos_block``, not in MiT."""
    names = [name for name, _ in model.named_parameters()]
    return [f"optim.{setting}.{key}: in no parameter name of the model, so it changes nothing"
            for setting in ("lr_mult", "decay_mult") for key in cfg[setting] if not any(key in n for n in names)]


def build_optimizer(model: torch.nn.Module, cfg: dict) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg["lr"], cfg["weight_decay"], cfg["lr_mult"], cfg["decay_mult"])
    if cfg["name"] == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]))
    return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"])


def lr_factor(iteration: int, cfg: dict) -> float:
    """Multiplier of the base learning rate at (0-based) ``iteration`` of the ``schedule`` config."""
    warmup, total = cfg["warmup"], cfg["iterations"]
    if iteration < warmup:
        start = cfg["warmup_start"]
        return start + (1.0 - start) * iteration / warmup
    progress = min(1.0, (iteration - warmup) / max(1, total - warmup))
    if cfg["decay"] == "poly":
        return (1.0 - progress) ** cfg["power"]
    if cfg["decay"] == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def set_learning_rate(optimizer: torch.optim.Optimizer, iteration: int, cfg: dict) -> float:
    """Set every group's lr for ``iteration``; returns the schedule's factor."""
    factor = lr_factor(iteration, cfg)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return factor
