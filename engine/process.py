"""Process-wide settings for running models, made by the programs that own their process: the
``geochange`` command line (detect, evaluate; the trainer's commands), the worker processes that QGIS
starts, and the benchmarks. Never by a class or function a library user calls (``Predictor``,
``detect``): each changes the whole Python process, whatever else runs in it. Without them a library
user gets the same results, at the speed and memory of the process as it is.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

# GDAL's block cache defaults to 5 % of the machine's memory and fills with the blocks of large rasters
# (read and written), so peak memory would grow with the raster's height; it is sized instead to the
# blocks a run keeps in use at once, which depend on the raster's width only.
MIN_GDAL_CACHE_BYTES = 256 * 2**20


def configure_process(*, threads: int | None = None, folder: Path | None = None) -> None:
    """Tune this process for running models: glibc keeps freed memory (``_keep_freed_memory``), cuDNN
    times each convolution's algorithms once for the size it meets, as windows and training crops share
    one size; torch computes on ``threads`` (default: its own choice, every core). ``folder``: the
    working folder, which relative paths are read from."""
    _keep_freed_memory()  # first: only threads that allocate after it share the one heap
    import torch

    torch.backends.cudnn.benchmark = True
    if threads:
        torch.set_num_threads(threads)
    if folder is not None:
        os.chdir(folder)


def _keep_freed_memory() -> None:
    """Let glibc keep large freed blocks in the process instead of returning them to the OS.

    A CPU forward allocates activations of hundreds of MB; by default glibc serves each from a fresh
    ``mmap`` and unmaps it on free, so every batch page-faults its memory in again, mostly as system
    time. Any finite threshold left some model paging: M2CD-MiT-b0's head concatenated 1 GiB for 4
    windows of 512 px (before ``heads.fuse_resized``), and a 2 GiB trim threshold let glibc trim it
    again. So both thresholds are set to "never" (once): memory is reused from the heap; RSS stays at
    its peak. And every thread allocates from that one heap: glibc gives each new thread its own, which
    would keep what the writer thread frees from the model's thread and the reverse (16384², TinyCD:
    peak RSS 2073 MiB with a heap per thread, 1844 MiB with one; 1815 MiB writing in the model's thread).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    never = -1  # mallopt takes an int that glibc reads as size_t: -1 is SIZE_MAX
    libc.mallopt(m_mmap_threshold, never)
    libc.mallopt(m_trim_threshold, never)
    if "MALLOC_ARENA_MAX" not in os.environ:  # the user's own choice stands
        libc.mallopt(m_arena_max, 1)  # for threads that first allocate after this


def bound_gdal_cache(in_use: int) -> None:
    """GDAL's block cache: a quarter more than the bytes of blocks a run keeps in use (``in_use``), at
    least 256 MB. Smaller, and blocks are evicted and decoded again before their last window is read;
    larger costs memory for little: at 16384² (TinyCD, a 2-core AMD EPYC) twice ``in_use`` (405 MiB)
    took 150 MiB more than this (256 MiB) for an I/O floor of 26.5-27.6 s against 28.8-30.1 s."""
    from osgeo import gdal

    gdal.SetCacheMax(max(MIN_GDAL_CACHE_BYTES, in_use * 5 // 4))
