"""Two training iterations per model family on real pairs, through to a model package the engine loads;
and the ``geochange train`` command with ``--set`` overrides."""
from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch
import yaml

from geochange.engine.cli import main as geochange
from geochange.engine.errors import GeoChangeError, OutputError
from geochange.engine.hardware import cpu_bf16, cpu_name
from geochange.engine.package import load_package
from geochange.engine.predictor import Predictor
from geochange.trainer.loop import MetricLog, Trainer
from test_write_failures import _tmpfs, fill, one_line_error
from trainer_setup import small_config

FAMILIES = {  # architecture: (dataset, expected loss terms, extra config)
    "tinycd": ("levir_cd", {"seg"}, {}),
    "m2cd_mit_b0": ("ombria", {"seg", "gate", "o2sp"}, {"loss": {"o2sp": 1e-4}, "data": {"optical_sar": True}}),
    "sscfnet_r50": ("levir_cd", {"seg", "aux"}, {"optim": {"name": "sgd", "lr": 0.01}}),
    "changer_mit_b0": ("dsifn", {"seg"}, {"augment": {"exchange": 0.5}}),
}


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("architecture", FAMILIES)
def test_two_iterations_to_a_package(architecture, shared_data, tmp_path):
    dataset, terms, extra = FAMILIES[architecture]
    cfg = small_config(tmp_path / "run", shared_data / dataset, architecture, **extra)
    results = Trainer(cfg).fit()
    rows = _rows(tmp_path / "run" / "train_log.csv")
    assert [int(r["iteration"]) for r in rows] == [1, 2]
    assert set(rows[0]) == {"iteration", "lr", "loss", "seconds_per_iter", *terms}
    for row in rows:
        assert math.isfinite(float(row["loss"]))
        assert float(row["loss"]) == pytest.approx(sum(float(row[t]) for t in terms), rel=1e-5)
    assert len(_rows(tmp_path / "run" / "val_log.csv")) == 1
    package = load_package(tmp_path / "run" / "best.safetensors")
    training = package.manifest["training"]
    assert training["method"] == ("o2sp" if "o2sp" in terms else "plain")
    assert training["config"]["model"]["architecture"] == architecture and training["iteration"] == 2
    assert training["data"]["datasets"] == [dataset] and training["data"]["train"] > 0
    assert set(training["metrics"]) == {"val", "test"}
    # train.amp auto: bf16 where the CPU computes in it (AMX, AVX512-BF16), fp32 elsewhere; said why.
    bf16, why = cpu_bf16()
    assert training["precision"] == {"autocast": "bf16" if bf16 else "fp32", "amp": "auto", "device": cpu_name(),
                                     "why": why}
    assert results["test"]["global"]["mIoU"] == training["metrics"]["test"]["global"]["mIoU"]
    assert set(results["test"]["car_bins"]) <= {"[0, 0.05)", "[0.05, 0.2)", "[0.2, 1]"}
    # The engine runs the exported package on raw pixels as it would any other.
    pre, post, _ = (np.stack([x]) for x in (np.zeros((3, 64, 64), np.uint8), np.zeros((3, 64, 64), np.uint8), 0))
    if "o2sp" in terms:
        post = post[:, :1]
    prob = Predictor(package, "cpu")(pre, post)
    assert prob.shape == (1, 64, 64) and np.isfinite(prob).all()


def test_geochange_train_command(shared_data, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tiny", "model": {"architecture": "tinycd"},
        "data": {"datasets": [{"root": str(shared_data / "dsifn"), "split": {"val": 0.1, "test": 0.1}}],
                 "batch": 2, "workers": 1},
        "augment": {"crop": {"size": 72}}, "schedule": {"iterations": 50, "warmup": 1},
        "train": {"val_interval": 100}, "test": {"tta": True, "scales": [0.5, 1.0]}}))
    assert geochange(["train", str(config), "--set", "schedule.iterations=2", "--set",
                      f"work_dir={tmp_path / 'out'}"]) == 0
    out = capsys.readouterr().out
    assert "test (best iteration 2)" in out and "CAR bin" in out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["test"]["tta"] == {"scales": [0.5, 1.0], "flip": True}
    assert len(results["test"]["files"]) == 1 and results["test"]["files"][0].startswith("dsifn/")  # by name
    assert load_package(tmp_path / "out" / "best.safetensors").tile == 72  # the crop it was trained on
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert saved["schedule"]["iterations"] == 2 and saved["data"]["workers"] == 1
    assert geochange(["train", str(config), "--set", "optim.nope=1"]) == 2
    assert "optim.nope: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"not a checkpoint", b"PK\x03\x04 cut short"],
                         ids=["missing", "text", "zip"])
def test_bad_backbone_weights_are_one_line(content, shared_data, tmp_path, capsys):
    config = tmp_path / "mit.yaml"
    config.write_text(yaml.safe_dump({
        "name": "mit", "work_dir": str(tmp_path / "out"), "model": {"architecture": "changer_mit_b0"},
        "data": {"datasets": [{"root": str(shared_data / "dsifn"), "split": {"val": 0.1, "test": 0.1}}],
                 "batch": 2, "workers": 0}}))
    weights = tmp_path / "mit_b0.pth"
    if content is not None:
        weights.write_bytes(content)
    assert geochange(["train", str(config), "--backbone-weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geochange: error: model.backbone_weights: ") and err.count("\n") == 1
    assert ("no such file" if content is None else "is not a checkpoint of tensors") in err
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_stops_before_its_weights_are_nan(shared_data, tmp_path):
    """Its steps went on with NaN weights, which the checkpoints kept and, without validation, the package."""
    cfg = small_config(tmp_path, shared_data / "levir_cd", optim={"name": "sgd", "lr": 1e6},
                       schedule={"iterations": 6}, train={"val_interval": 5, "checkpoint_interval": 1})
    with pytest.raises(GeoChangeError, match=r"^iteration \d: the loss or its gradients are not finite \(seg .+, "
                                             r"gradient norm .+\): training diverged; lower optim.lr or set "
                                             r"optim.clip_grad$"):
        Trainer(cfg).fit()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert not (tmp_path / "best.safetensors").exists()


def test_a_log_on_a_full_disk_is_one_error_and_a_resume_on_it_keeps_the_log(tmp_path):
    """Appending a row was a raw OSError; a resume's cut of the rows past its checkpoint rewrote the log in place,
    so a full disk emptied it."""
    with _tmpfs(tmp_path / "disk", "size=1m") as disk:
        log = disk / "train_log.csv"
        fill(disk)
        with pytest.raises(OutputError, match=f"^{log}: no space left on the device$"):
            MetricLog(disk, True, None, False).train(1, {"loss": 0.5, "lr": 0.1})
        (disk / "filler").unlink()
        rows = MetricLog(disk, True, None, False)
        for iteration in range(1, 5):
            rows.train(iteration, {"loss": 0.5, "lr": 0.1})
        before = log.read_text()
        fill(disk)
        with pytest.raises(OutputError, match=f"^{log}: no space left on the device$"):
            MetricLog(disk, True, 2, False)
        assert log.read_text() == before and before.count("\n") == 5


def test_a_resume_drops_a_log_row_cut_short(tmp_path):
    """A run killed (or a disk filled) mid-row left a row the resume's cut could not read."""
    log = MetricLog(tmp_path, True, None, False)
    for iteration in (1, 2, 3):
        log.train(iteration, {"loss": 0.5, "lr": 0.1})
    with open(tmp_path / "train_log.csv", "a") as f:
        f.write("4,0.5\n\n")
    MetricLog(tmp_path, True, 3, False)
    assert (tmp_path / "train_log.csv").read_text().splitlines() == [
        "iteration,loss,lr", "1,0.5,0.1", "2,0.5,0.1", "3,0.5,0.1"]


@pytest.mark.parametrize("place", ["full", "read-only"])
def test_a_full_or_read_only_work_folder_is_one_line(place, shared_data, tmp_path, capsys):
    """The checkpoint on a full disk (torch's writer raises RuntimeError, not OSError), and a work folder on a
    read-only disk, were tracebacks."""
    with _tmpfs(tmp_path / "disk", "size=8m" if place == "full" else "size=1m,ro") as disk:
        if place == "full":  # room for the config and the log, not for the checkpoint (3 MB)
            filler = fill(disk)
            os.truncate(filler, filler.stat().st_size - 2**20)
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump(small_config(disk / "run", shared_data / "levir_cd")))
        line = one_line_error(capsys, "train", config, "--until", "1")
        if place == "full":
            assert line == f"geochange: error: {disk / 'run' / 'last.pt'}: no space left on the device"
            assert sorted(p.name for p in (disk / "run").iterdir()) == ["config.yaml", "train_log.csv"]
        else:
            assert line == f"geochange: error: {disk / 'run'}: cannot be written: Read-only file system"
