"""A model's forward run by OpenVINO on the CPU: exported from the package once, kept in this user's cache.

The export is OpenVINO's IR (``.xml`` + ``.bin``, fp32 weights) of the model traced by PyTorch with free batch and
window sides, checked against PyTorch before it is kept, and named by ``backends.model_digest`` (the architectures'
code, the architecture and every tensor) and both libraries' versions: another package, a changed forward or a new
OpenVINO exports again; the most recently used exports are kept, up to ``CACHE_BYTES``. Windows run one at a time,
each window shape compiled when first met (about a second), in bf16 (OpenVINO's inference precision hint) where the
run's precision is bf16, else fp32: on this project's CPU four 512 px windows took no longer one by one than as a
batch (TinyCD and M2CD-MiT-b0, 2 threads), and a compiled shape of one window holds a third of the memory of a
batch of four's (TinyCD 137 against 346 MB, M2CD with every expert on every token 388 against 1177 MB); a run
also meets one shape, not two (its tile rows' last, smaller batch). The last compiled shape stays for the process's
next run (``compiled_model``): detect-many's pairs on a worker compile a model of one network once (a router's
members, each pair again).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import openvino as ov
import torch

from geochange.engine.atomic import new_token
from geochange.engine.backends import input_channels, model_digest, user_cache_dir
from geochange.engine.predictor import to_probability

# Largest difference of a change probability between the export and PyTorch, both fp32, on a test input.
VERIFY_TOLERANCE = 0.01
# The last model compiled, by (export, window shapes, settings) -> compiled model: each worker of detect-many keeps
# its model's for its next pairs. Only the last: a run's requests keep its own alive, and a worker's memory, which
# detect-many budgets from a pair's peak, then holds no more compiled models than a pair does.
_compiled: dict = {}
_compiling = threading.Lock()  # a worker may run pairs in several threads, which compile one at a time
# The exports kept: the most recently used, up to this many bytes (each new package, a test's random one
# included, adds one: M2CD-MiT-b0's is 14 MB, a ConvNeXt-B model's 1 GB).
CACHE_BYTES = 4 * 2**30


@functools.cache
def core() -> ov.Core:
    """The process's one OpenVINO Core: with a Core made for each model, a long process crashed later in
    unrelated Python code (this project's test suite, its fresh-clone run; ultralytics PR 25864 reports
    the same); with one, it did not."""
    return ov.Core()


def exported_model(package, log) -> Path:
    """The package's model as OpenVINO IR in the cache, exported and checked first if it is not there."""
    name = package.manifest["architecture"]
    path = user_cache_dir("openvino") / f"{name}-{model_digest(package)[:32]}-ov{ov.get_version().split('-')[0]}-" \
                                        f"torch{torch.__version__.split('+')[0]}.xml"
    if path.exists():
        os.utime(path)  # used: the last to go
        log(f"{name}: OpenVINO export from the cache ({path})")
        return path
    start = time.perf_counter()
    pre, post = input_channels(package)
    example = (torch.rand(1, pre, 64, 64), torch.rand(1, post, 64, 64))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the trace's shape arithmetic stays symbolic
        # OpenVINO's PyTorch front end traces with TorchScript, which torch now calls deprecated.
        warnings.filterwarnings("ignore", message="`torch.jit.trace", category=FutureWarning)
        model = ov.convert_model(package.model, example_input=example,
                                 input=[ov.PartialShape([-1, channels, -1, -1]) for channels in (pre, post)])
    _verify(model, package)
    # The .bin first, then the .xml that names a complete export: a run killed between leaves no .xml.
    partial = path.with_name(f".{path.stem}.{new_token()}.partial.xml")
    try:
        ov.save_model(model, partial, compress_to_fp16=False)
        os.replace(partial.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(partial, path)
    except BaseException:  # a full disk, a cancel: nothing half-written stays in the cache
        for leftover in (partial, partial.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # another run pruning at the same time
        prune(path.parent)
    log(f"{name}: exported to OpenVINO and checked against PyTorch in {time.perf_counter() - start:.0f} s ({path})")
    return path


def prune(folder: Path) -> None:
    """Remove the least recently used exports in ``folder`` beyond ``CACHE_BYTES`` (the newest always stays)."""
    def size(xml: Path) -> int:
        return sum(p.stat().st_size for p in (xml, xml.with_suffix(".bin")) if p.exists())

    total = 0
    for i, xml in enumerate(sorted(folder.glob("[!.]*.xml"), key=lambda p: p.stat().st_mtime, reverse=True)):
        total += size(xml)
        if i and total > CACHE_BYTES:
            xml.unlink(missing_ok=True)  # the .xml first: no export is left without its weights
            xml.with_suffix(".bin").unlink(missing_ok=True)


def _verify(model, package) -> None:
    """Refuse an export whose probabilities differ from PyTorch's (fp32 both) on a batch of another shape
    than the trace's: a shape or a branch frozen by the trace shows here."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, channels, 96, 128, generator=generator) for channels in input_channels(package)]
    with torch.no_grad():
        expected = to_probability(package.model(*inputs).float(), package.activation)
    compiled = core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = to_probability(torch.from_numpy(compiled([x.numpy() for x in inputs])[0]), package.activation)
    difference = float((got - expected).abs().max())
    if not difference <= VERIFY_TOLERANCE:  # NaN too
        raise ValueError(f"its export gives probabilities up to {difference:.3g} away from PyTorch's")


def compiled_model(path: Path, model: ov.Model, shapes: tuple, config: dict) -> ov.CompiledModel:
    """``model``, the export at ``path``, compiled for inputs of ``shapes`` with ``config``, kept until another is
    compiled (so the process's next run of the same model and shape compiles nothing). Each caller runs it through
    its own requests."""
    key = (str(path), shapes, tuple(sorted(config.items())))
    with _compiling:
        if key not in _compiled:
            _compiled.clear()
            model = model.clone()
            model.reshape({model.inputs[0]: list(shapes[0]), model.inputs[1]: list(shapes[1])})
            _compiled[key] = core().compile_model(model, "CPU", config)
        return _compiled[key]


class OpenVINOForward:
    """``(pre, post) -> logits`` through OpenVINO, a window at a time, compiled for each window shape on as many
    threads as torch."""

    def __init__(self, package, dtype: torch.dtype, log):
        self.path = exported_model(package, log)
        self.model = core().read_model(self.path)  # here, so that an unreadable export leaves PyTorch to run
        self.config = {"INFERENCE_PRECISION_HINT": "bf16" if dtype == torch.bfloat16 else "f32",
                       "INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
        self.requests: dict = {}  # window shapes -> this forward's own request (a request runs one window at once)

    def __call__(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        key = ((1, *pre.shape[1:]), (1, *post.shape[1:]))
        if key not in self.requests:
            self.requests[key] = compiled_model(self.path, self.model, key, self.config).create_infer_request()
        request, logits = self.requests[key], None
        for i in range(len(pre)):
            request.infer([np.ascontiguousarray(x[i:i + 1].numpy()) for x in (pre, post)], share_inputs=True)
            window = request.get_output_tensor(0).data  # the request's buffer, which the next window overwrites
            if logits is None:
                logits = np.empty((len(pre), *window.shape[1:]), window.dtype)
            logits[i] = window[0]
        return torch.from_numpy(logits)
