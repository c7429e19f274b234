"""A run stopped at iteration k and resumed reaches iteration 2k with exactly the losses and weights of an
unbroken run (CPU, determinism on): model, optimiser, RNG states, schedule and data stream all resume."""
from __future__ import annotations

import csv

import pytest
import torch
import yaml

from geochange.trainer.cli import main as trainer_cli
from geochange.trainer.loop import Trainer
from trainer_setup import small_config


def _losses(work_dir):
    with open(work_dir / "train_log.csv", newline="") as f:
        return [(r["iteration"], r["lr"], r["loss"], r["gate"], r["o2sp"]) for r in csv.DictReader(f)]


@pytest.fixture
def deterministic():
    """deterministic: true switches torch's process-wide flag; the other tests get it back off."""
    yield {"deterministic": True}
    torch.use_deterministic_algorithms(False)


def test_resume_is_bitwise(shared_data, tmp_path, deterministic):
    # M2CD with O2SP: gate noise and drop-path draw from the global RNG, the speckle from its own seed.
    sections = {**deterministic, "loss": {"o2sp": 1e-4}, "data": {"optical_sar": True, "workers": 1},
                "schedule": {"iterations": 4, "warmup": 1}, "train": {"val_interval": 3, "checkpoint_interval": 2}}
    unbroken = Trainer(small_config(tmp_path / "unbroken", shared_data / "ombria", "m2cd_mit_b0", **sections))
    unbroken.fit()

    cfg = small_config(tmp_path / "broken", shared_data / "ombria", "m2cd_mit_b0", **sections)
    config = tmp_path / "broken.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert trainer_cli(["train", str(config), "--until", "2"]) == 0
    assert not (tmp_path / "broken" / "results.json").exists()
    assert [r[0] for r in _losses(tmp_path / "broken")] == ["1", "2"]
    assert trainer_cli(["train", str(config), "--resume"]) == 0

    assert _losses(tmp_path / "broken") == _losses(tmp_path / "unbroken")
    resumed = torch.load(tmp_path / "broken" / "last.pt", weights_only=True)
    reference = torch.load(tmp_path / "unbroken" / "last.pt", weights_only=True)
    assert resumed["iteration"] == reference["iteration"] == 4
    for key, value in reference["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert all(torch.equal(a, b) for a, b in zip(resumed["rng"], reference["rng"]))
    # The validation at iteration 3 happened in the resumed part only; both kept the same best.
    assert resumed["best"] == reference["best"]
    leftovers = [p.name for p in (tmp_path / "broken").iterdir() if ".partial" in p.name]
    assert not leftovers
