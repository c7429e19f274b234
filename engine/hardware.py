"""What this machine offers the models: its CPU's name, whether bf16 arithmetic is native to it, its memory.

bf16 autocast pays on a CPU only where matrix units or vector instructions take bf16 directly (Intel AMX,
AVX512-BF16 on Intel and AMD): elsewhere PyTorch converts each operand to fp32 and back, slower than fp32.
"""
from __future__ import annotations

import functools
import os
import platform

import torch

# Instruction sets that compute in bf16, in the order a reason names them.
BF16_FEATURES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}
# Those that set a model's speed on a CPU, as a benchmark names the machine by them.
SPEED_FEATURES = ("avx2", "fma3", "avx512_f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_capabilities() -> dict:
    """PyTorch's view of the CPU (cpuinfo): its name and instruction sets; empty where torch has none."""
    try:
        return dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError):  # an older torch, or cpuinfo unavailable
        return {}


def cpu_name(caps: dict | None = None) -> str:
    caps = cpu_capabilities() if caps is None else caps
    return caps.get("cpu_name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_bf16(caps: dict | None = None) -> tuple[bool, str]:
    """(whether to compute in bf16 on the CPU of ``caps``, default this one; why): the features found,
    or their absence."""
    caps = cpu_capabilities() if caps is None else caps
    found = [name for flag, name in BF16_FEATURES.items() if caps.get(flag)]
    if found:
        return True, f"{cpu_name(caps)} has {' and '.join(found)}"
    return False, f"{cpu_name(caps)} has neither {' nor '.join(BF16_FEATURES.values())}"


def cpu_flags(caps: dict | None = None) -> list[str]:
    """The ``SPEED_FEATURES`` of the CPU of ``caps``, default this one."""
    caps = cpu_capabilities() if caps is None else caps
    return [flag for flag in SPEED_FEATURES if caps.get(flag)]


def physical_memory() -> int | None:
    """The machine's memory in bytes; None where the system does not say (no ``sysconf`` on Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
