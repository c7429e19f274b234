"""Registry of change-detection architectures.

Every architecture is a factory registered under a name (``tinycd``, ``m2cd_mit_b0`` ...).
A model's ``forward(pre, post)`` takes two ``(N, C, H, W)`` float tensors and, in eval mode,
returns logits at the input size: one channel (sigmoid activation) or two channels
(softmax, channel 1 = change). In training mode a model may return a dict with ``logits``
and extra terms (auxiliary heads, gate losses); the engine only runs eval mode.

Each registered factory carries a ``ModelSpec`` with what the engine and ``geochange models``
need to know without building the model: the output activation, the inputs it expects by
default, and the figures its paper publishes.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    factory: Callable[..., nn.Module]
    activation: str  # "sigmoid" (1 output channel) or "softmax" (2 channels)
    inputs: tuple  # default input spec per date, see engine.manifest.make_manifest
    paper: dict = field(default_factory=dict)  # published params (M), GFLOPs, accuracy
    description: str = ""
    training_only: tuple = ()  # parameter-name prefixes used in training only (auxiliary heads)


_REGISTRY: dict[str, ModelSpec] = {}
_loaded = False


def register(name: str, *, activation: str, inputs: tuple, paper: dict | None = None,
             description: str = "", training_only: tuple = ()):
    """Decorator: register ``factory(**kwargs) -> nn.Module`` under ``name``."""
    if activation not in ("sigmoid", "softmax"):
        raise ValueError(f"activation must be sigmoid or softmax, not {activation!r}")

    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, factory, activation, tuple(inputs), dict(paper or {}),
                                    description, tuple(training_only))
        return factory

    return wrap


def _load_families() -> None:
    """Import every module of this package once; the family modules register their variants."""
    global _loaded
    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True


def spec(name: str) -> ModelSpec:
    _load_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def create(name: str, **kwargs) -> nn.Module:
    """Build the registered architecture ``name`` with random weights (nothing is downloaded)."""
    return spec(name).factory(**kwargs)


def list_models() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)
