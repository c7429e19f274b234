"""Process-wide settings (glibc's allocator, cuDNN's autotuning, torch's threads, GDAL's cache, the working
folder) are made by the programs that own their process, never by a library call."""
from __future__ import annotations

import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from osgeo import gdal

from geochange.engine import process
from geochange.engine.cli import main
from geochange.engine.detect import detect
from geochange.engine.worker import run_detect, run_evaluate
from geochange.trainer import cli as trainer_cli
from geochange.trainer.worker import run_train
from test_detect import outputs, write_raster
from trainer_setup import small_config


@pytest.fixture
def pair(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    return write_raster(tmp_path / "a.tif", data), write_raster(tmp_path / "b.tif", data[::-1].copy())


def test_a_library_run_leaves_the_process_as_it_was(tmp_path, pair, random_package, monkeypatch):
    freed = []
    monkeypatch.setattr(process, "_keep_freed_memory", lambda: freed.append(True))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    threads, cache = torch.get_num_threads(), gdal.GetCacheMax()
    detect(*pair, random_package, **outputs(tmp_path / "out"), tile=64, overlap=16, device="cpu")
    assert freed == [] and torch.backends.cudnn.benchmark is False
    assert (torch.get_num_threads(), gdal.GetCacheMax()) == (threads, cache)


def test_the_command_line_and_the_workers_tune_their_process(tmp_path, pair, random_package, monkeypatch):
    calls = []
    monkeypatch.setattr(process, "configure_process", lambda **settings: calls.append(settings))
    monkeypatch.setattr(trainer_cli, "configure_process", process.configure_process)
    data = tmp_path / "dataset"
    for folder, path in (("A", pair[0]), ("B", pair[1])):
        (data / folder).mkdir(parents=True)
        (data / folder / "x.tif").write_bytes(path.read_bytes())
    label = np.zeros((1, 64, 64), np.uint8)
    label[:, :10] = 255
    (data / "label").mkdir()
    write_raster(data / "label" / "x.tif", label)
    cache = gdal.GetCacheMax()
    try:
        assert main(["detect", *map(str, pair), "--model", str(random_package), "--out", str(tmp_path / "cli"),
                     "--tile", "64", "--overlap", "16", "--device", "cpu", "--threads", "1"]) == 0
        assert main(["evaluate", "--model", str(random_package), "--data", str(data), "--device", "cpu"]) == 0
        run_detect({"pre": str(pair[0]), "post": str(pair[1]), "model": str(random_package), "tile": 64,
                    "overlap": 16, "device": "cpu", "threads": 1, **outputs(tmp_path / "worker")}, lambda line: None)
        run_evaluate({"model": str(random_package), "data": str(data), "device": "cpu"}, lambda line: None)
        assert trainer_cli.main(["train", str(tmp_path / "none.yaml")]) == 2  # tuned, then the config refused
        # The worker tunes once the config is read (a refused one leaves no package folder made), here one whose
        # dataset is missing, found when the trainer is built.
        config = tmp_path / "nowhere.yaml"
        config.write_text(yaml.safe_dump(small_config(tmp_path / "run", tmp_path / "nowhere")))
        with pytest.raises(Exception, match="nowhere"):
            run_train({"config": str(config), "package": str(tmp_path / "p.safetensors")}, lambda line: None)
    finally:
        gdal.SetCacheMax(cache)
    assert calls == [{"threads": 1}, {}, {"threads": 1}, {}, {}, {"folder": tmp_path.resolve()}]


HEAPS_AFTER_A_THREAD = """
import ctypes, sys, tempfile, threading
from geochange.engine.process import configure_process
if sys.argv[1] == "configured":
    configure_process()
thread = threading.Thread(target=lambda: [bytearray(2**20) for _ in range(8)])
thread.start()
thread.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
with tempfile.NamedTemporaryFile(suffix=".xml") as report:
    stream = ctypes.c_void_p(libc.fopen(report.name.encode(), b"w"))
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    print(open(report.name).read().count("<heap nr="))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_a_tuned_process_gives_its_threads_one_heap(monkeypatch):
    # The writer thread frees memory the model's thread then reuses: with a heap per thread, 16384² runs
    # peaked 230 MiB higher.
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    heaps = {state: int(subprocess.run([sys.executable, "-c", HEAPS_AFTER_A_THREAD, state], capture_output=True,
                                       text=True, check=True).stdout) for state in ("as started", "configured")}
    assert heaps["as started"] >= 2 and heaps["configured"] == 1
