"""Which runtime runs a model's forward on the CPU: eager PyTorch, torch.compile graphs (``engine.compiled``)
or OpenVINO (``engine.exported``), chosen once per run.

``auto``, the front ends' default, takes OpenVINO where it is installed (requirements.txt lists it: ``make setup``
and QGIS's set-up install it) and eager PyTorch elsewhere: on this project's CPU OpenVINO's forward took
a fraction of torch's own best (torch.compile in bf16), and torch.compile costs a minute or more per window
shape the first time (bench/results.md). ``compile`` and ``openvino`` are asked for by name. A model that
torch.compile cannot make into one graph (M2CD-ConvNeXt's sparse expert routing), or whose compile or export fails,
runs eagerly and the log says why. On a GPU the model runs eagerly, as CUDA graphs (``Predictor``).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from geochange.engine.errors import OptionError
from geochange.engine.inputs import model_channels
from geochange.engine.models.moe import MixtureOfExperts
from geochange.engine.options import spec
from geochange.engine.progress import raise_if_stopped

BACKENDS = spec("backend").metadata["choices"]


def user_cache_dir(name: str) -> Path:
    """``name`` in this user's cache folder (made if missing): ``$GEOCHANGE_CACHE_DIR``, else the platform's
    (``%LOCALAPPDATA%``, ``~/Library/Caches``, ``$XDG_CACHE_HOME`` or ``~/.cache``) + ``geochange``."""
    root = os.environ.get("GEOCHANGE_CACHE_DIR")
    if not root:
        if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
            base = Path(os.environ["LOCALAPPDATA"])
        elif sys.platform == "darwin":
            base = Path.home() / "Library" / "Caches"
        else:
            base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        root = base / "geochange"
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_backend(backend: str, device: torch.device) -> tuple[str, str]:
    """(the backend that runs, why) for ``backend`` on ``device``; a backend that cannot run here is refused."""
    if backend not in BACKENDS:
        raise OptionError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if device.type != "cpu":
        if backend in ("compile", "openvino"):
            raise OptionError(f"--backend {backend} is for the CPU; on {device} leave it at auto or eager "
                              "(the model runs as CUDA graphs)")
        return "eager", "the model runs as CUDA graphs on the GPU"
    if backend == "auto":
        if openvino_installed():
            return "openvino", "OpenVINO is installed (--backend eager runs PyTorch)"
        return "eager", "OpenVINO is not installed (pip install openvino: a faster CPU forward)"
    if backend == "openvino" and not openvino_installed():
        raise OptionError(f"--backend openvino: OpenVINO is not installed for {sys.executable} (pip install openvino)")
    return backend, "asked for"


def compile_refusal(model: torch.nn.Module) -> str | None:
    """Why torch.compile cannot make ``model`` one graph, or None. (An export for OpenVINO can: a trace keeps
    the sparse expert routing's group sizes free, ``MixtureOfExperts._mix_traced``.)"""
    if any(isinstance(m, MixtureOfExperts) and not m.every_expert_in_graphs for m in model.modules()):
        # Its every-expert form would cost 1.6 to 2.5 times the experts' compute (M2CD-ConvNeXt).
        return "its sparse expert routing sizes the experts' groups from the gates, on the host"
    return None


def model_digest(package) -> str:
    """sha256 of what a model's graph is made from: the architectures' code (and timm's version), the model's
    architecture and arguments, the channels of its inputs, and every tensor (name, type, shape and bytes).
    With the code in it, an export made before a change of a model's forward is not run after it."""
    manifest = package.manifest
    digest = hashlib.sha256(architectures_code_digest().encode())
    digest.update(json.dumps([manifest["architecture"], manifest["arch_kwargs"], input_channels(package)],
                             sort_keys=True).encode())
    for name, tensor in package.model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@functools.cache
def architectures_code_digest() -> str:
    """sha256 of the code of every architecture's forward: the sources of ``engine/models`` and the version
    of timm, whose backbones they build on."""
    import timm

    digest = hashlib.sha256(f"timm {timm.__version__}".encode())
    for source in sorted(Path(__file__).with_name("models").glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def input_channels(package) -> tuple[int, int]:
    inputs = package.manifest["inputs"]
    return model_channels(inputs["pre"]), model_channels(inputs["post"])


def model_forward(package, backend: str, dtype: torch.dtype, log):
    """``(pre, post) -> logits`` running ``package``'s model with ``backend`` (a resolved one), or the eager
    model where that backend cannot run it (said in the log)."""
    if backend == "eager":
        return package.model
    name = package.manifest["architecture"]
    if backend == "compile":
        refusal = compile_refusal(package.model)
        if refusal:
            log(f"{name} runs eagerly: {refusal}")
            return package.model
        from geochange.engine.compiled import CompiledForward
        return CompiledForward(package, log)
    try:
        from geochange.engine.exported import OpenVINOForward  # an installed OpenVINO may still fail to import

        return OpenVINOForward(package, dtype, log)
    except Exception as error:  # the converter's errors have no common type; any of them leaves eager
        raise_if_stopped()
        log(f"{name} runs eagerly: OpenVINO could not run it ({str(error).strip().splitlines()[0]})")
        return package.model
