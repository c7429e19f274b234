"""torchrun with two CPU processes (DDP over gloo) follows the loss curve of one process with the same
global batch (within 1e-4). BatchNorm runs on its running statistics (``freeze_bn``): per-process
batch statistics would differ by construction, and SyncBN needs CUDA."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import yaml

from conftest import free_port
from trainer_setup import small_config


def _losses(work_dir) -> list[float]:
    with open(work_dir / "train_log.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_two_processes_match_one(shared_data, tmp_path):
    cfg = small_config(tmp_path / "one", shared_data / "levir_cd", "tinycd", model={"freeze_bn": True},
                       schedule={"iterations": 4, "warmup": 1},
                       # fp32: bf16 autocast (auto on CPUs with AVX512-BF16/AMX) rounds each process's
                       # partial sums, which moves the curves apart by more than float order does.
                       train={"val_interval": 100, "amp": "off"})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "geochange.trainer", "train", str(config)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                               "-m", "geochange.trainer", "train", str(config),
                               "--set", f"work_dir={tmp_path / 'two'}"],
                              env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-2000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert two == pytest.approx(one, abs=1e-4)
    assert one[0] != one[-1]  # the weights did move
    assert (tmp_path / "two" / "best.safetensors").is_file()


def _check_one_batch(rank: int, fp16: bool, port: int, out) -> None:
    """One DDP step's check on two gloo processes, rank 1's batch overflowing; what each decided, in ``out``."""
    import datetime
    import types

    import torch
    import torch.distributed as dist

    from geochange.trainer.loop import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    batch = torch.ones(2, 4)
    if rank == 1:
        batch[0, 0] = float("inf")
    loss = net(batch).sum()
    scaler = torch.amp.GradScaler("cpu", enabled=fp16)  # fp16: only the loss is checked, each process's own
    scaler.scale(loss).backward()
    trainer = types.SimpleNamespace(scaler=scaler, module=net.module, iteration=0, world=2)
    try:
        Trainer.check_finite(trainer, loss, {"seg": loss})
        decided = "went on"
    except Exception as error:  # noqa: BLE001 (what it raised is the finding)
        decided = type(error).__name__
    (out / f"{rank}").write_text(decided)
    # Out at once, gloo's threads and all: its teardown after a run of the whole suite aborted a process now and then
    # ("terminate called without an active exception"), which is not what this test is about.
    os._exit(0)


@pytest.mark.parametrize("fp16", [False, True])
def test_a_batch_not_finite_on_one_process_stops_every_process(fp16, tmp_path):
    """Under fp16 each process checked its own loss: one stopped while the other waited in the next collective."""
    import torch.multiprocessing as mp

    mp.spawn(_check_one_batch, args=(fp16, free_port(), tmp_path), nprocs=2, join=True)
    assert [(tmp_path / f"{rank}").read_text() for rank in (0, 1)] == ["GeoChangeError", "GeoChangeError"]
