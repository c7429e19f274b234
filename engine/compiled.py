"""A model's forward as torch.compile graphs on the CPU, one per input shape, their code kept on disk.

Inductor's compiled code (FX graph and AOTAutograd caches) goes to this user's cache folder
(``backends.user_cache_dir``) unless the caller named one in ``TORCHINDUCTOR_CACHE_DIR``: inductor's default
is under ``/tmp``, emptied at each boot. A later run of the same model and shape still traces it but loads
the code. Any failure to compile (no C++ compiler, an unsupported operator) leaves the model eager, said in
the log.
"""
from __future__ import annotations

import os
import time

import torch

from geochange.engine.backends import user_cache_dir
from geochange.engine.progress import raise_if_stopped


def _cache_in_user_folder(log) -> None:
    """Point inductor, which reads its cache folder from the environment, at the user's cache folder, unless
    the caller chose one: importing timm (or torch._dynamo) already sets the variable to inductor's default.
    Where that folder cannot be made (a read-only home), inductor's default stays."""
    from torch._inductor.runtime.runtime_utils import default_cache_dir

    default = os.path.abspath(default_cache_dir())
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default):
        try:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(user_cache_dir("inductor"))
        except OSError as error:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = default
            log(f"compiled code kept in {default}, emptied at each boot: the user's cache folder cannot be made "
                f"({error.strerror or error})")


class CompiledForward:
    """``(pre, post) -> logits`` through a graph compiled for each input shape (and autocast state)."""

    def __init__(self, package, log):
        _cache_in_user_folder(log)
        self.model, self.log = package.model, log
        self.name = package.manifest["architecture"]
        self.compiled = torch.compile(package.model, dynamic=False)
        self.shapes: set = set()

    def __call__(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.model(pre, post)
        key = (tuple(pre.shape), tuple(post.shape), torch.get_autocast_dtype("cpu"), torch.is_autocast_enabled("cpu"))
        if key in self.shapes:
            return self.compiled(pre, post)
        start = time.perf_counter()
        try:
            out = self.compiled(pre, post)
        except Exception as error:  # inductor's and the C++ compiler's errors have no common type
            raise_if_stopped()
            self.log(f"{self.name} runs eagerly: torch.compile failed ({str(error).strip().splitlines()[0]})")
            self.compiled = None
            return self.model(pre, post)
        self.shapes.add(key)
        self.log(f"{self.name} compiled for inputs {list(pre.shape)} in {time.perf_counter() - start:.1f} s "
                 f"(cached in {os.environ['TORCHINDUCTOR_CACHE_DIR']})")
        return out
