"""A run stopped at iteration k and resumed reaches iteration 2k with exactly the losses and weights of an
unbroken run (CPU, determinism on): model, optimiser, RNG states, schedule and data stream all resume."""
from __future__ import annotations

import csv
import pickle
import re

import pytest
import torch
import yaml

from geochange.engine.atomic import folder_lock
from geochange.engine.errors import OutputError
from geochange.engine.package import load_package, save_package
from geochange.trainer.cli import main as trainer_cli
from geochange.trainer.config import ConfigError
from geochange.trainer.loop import Trainer, run_config
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


def test_a_checkpoint_the_run_cannot_continue_from_is_one_line(shared_data, tmp_path):
    """Another architecture, optimiser, optimiser setting or parameter grouping, a file that is no trainer
    checkpoint: each was a torch error (hundreds of keys, an unpickler's advice, KeyError 'model' or 'momentum')
    or a silent mix."""
    levir = shared_data / "levir_cd"
    cfg = small_config(tmp_path / "run", levir, schedule={"iterations": 3, "warmup": 1}, train={"val_interval": 3})
    first = Trainer(cfg)
    assert first.fit(until=2) is None
    checkpoint = first.checkpoint_path
    old = tmp_path / "old.pt"  # written before checkpoints recorded what they fit
    torch.save({k: v for k, v in torch.load(checkpoint, weights_only=True).items() if k != "fit"}, old)
    pickled = tmp_path / "pickled.pt"
    pickled.write_bytes(pickle.dumps(tmp_path, protocol=2))
    package = save_package(first.module, first.manifest({}), tmp_path / "model.safetensors")

    def refused(path, architecture="tinycd", **sections):
        with pytest.raises(ConfigError) as e:
            Trainer(small_config(tmp_path / "other", levir, architecture, **sections)).fit(resume=path)
        assert not (tmp_path / "other").exists()
        return str(e.value)

    prefix = f"--resume: {checkpoint} does not fit this config: "
    assert refused(checkpoint, "changer_mit_b0") == prefix + "it is of tinycd {}, this config's model.architecture " \
                                                            "and model.kwargs are changer_mit_b0 {}"
    assert refused(checkpoint, optim={"name": "sgd"}) == prefix + "its optimiser is adamw, optim.name is sgd"
    assert refused(checkpoint, optim={"lr_mult": {"classifier": 10}}) == \
        prefix + "its optim.lr_mult is {}, this config's {'classifier': 10}"
    # Settings the optimiser's state holds, which loading it would have put back silently.
    assert refused(checkpoint, optim={"lr": 1e-3, "betas": [0.5, 0.9]}) == prefix + (
        "its optim.lr is 0.0001, this config's 0.001, its optim.betas is [0.9, 0.999], this config's [0.5, 0.9]")
    assert refused(checkpoint, schedule={"iterations": 1, "warmup": 0}) == \
        prefix + "it is at iteration 2, past schedule.iterations (1)"
    # The rest of the config: another dataset, seed, batch or crop would have made one run of two.
    assert refused(checkpoint, seed=1, data={"batch": 4}, augment={"crop": {"size": 80}}) == prefix + (
        "its seed is 0, this config's 1, its data.batch is 2, this config's 4, its augment.crop.size is 72, "
        "this config's 80 (a run resumes with the config it was started with)")
    other_split = {"datasets": [{"root": str(levir), "split": {"val": 0.1, "test": 0.1, "seed": 1}}]}
    assert refused(checkpoint, data=other_split) == prefix + (
        "its data.datasets.0.split.seed is 0, this config's 1 (a run resumes with the config it was started with)")
    # A warm-up the run is not past (iteration 2) changes its learning rates from here.
    assert refused(checkpoint, schedule={"iterations": 5, "warmup": 3}) == prefix + (
        "its schedule.warmup is 1, this config's 3 (a run resumes with the config it was started with)")
    assert re.fullmatch(rf"--resume: {old} does not fit this config: its tensors differ from this config's "
                        r"changer_mit_b0: \d+ tensors missing \(e\.g\. .+\); \d+ tensors not in the model \(.+\)",
                        refused(old, "changer_mit_b0"))
    for path in (pickled, package):
        assert refused(path).startswith(f"--resume: {path} is not a trainer checkpoint (")
    # A checkpoint from before fits (or configs) were recorded resumes where it fits.
    resumed = Trainer(cfg)
    resumed.load_checkpoint(old)
    assert resumed.iteration == 2
    state = torch.load(checkpoint, weights_only=True)
    del state["fit"]["config"]
    torch.save(state, old)
    Trainer(small_config(tmp_path / "run", levir, data={"batch": 4})).load_checkpoint(old)
    # What does not change what the run learns may change, and a warm-up both runs are past; the weights a run
    # started from too (the checkpoint's replace them; a moved MTKD work_dir moves its distillation's model.init).
    assert not {"model.init", "model.backbone_weights"} & set(run_config(cfg))
    Trainer(small_config(tmp_path / "moved", levir, schedule={"iterations": 5, "warmup": 2}, name="renamed",
                         data={"workers": 1}, train={"val_interval": 4, "log_interval": 2, "checkpoint_interval": 3},
                         test={"tta": True})).load_checkpoint(checkpoint)


def test_extending_a_run_without_validation_packages_its_last_weights(shared_data, tmp_path):
    """No validation picks the best: the package is the model as the run ends, the extended run's too."""
    unvalidated = {"data": {"datasets": [{"root": str(shared_data / "levir_cd"), "split": {"val": 0.0}}]}}
    Trainer(small_config(tmp_path, shared_data / "levir_cd", **unvalidated)).fit()
    assert load_package(tmp_path / "best.safetensors").manifest["training"]["iteration"] == 2
    Trainer(small_config(tmp_path, shared_data / "levir_cd", schedule={"iterations": 3}, **unvalidated)).fit(
        resume=True)
    assert load_package(tmp_path / "best.safetensors").manifest["training"]["iteration"] == 3


@pytest.mark.parametrize("until", [0, -1])
def test_until_below_the_first_iteration_is_refused(until, shared_data, tmp_path):
    """--until 0 trained to the end; -1 trained nothing and said to continue with --resume."""
    with pytest.raises(ConfigError, match=f"^--until: the iteration to stop after must be at least 1, not {until}$"):
        Trainer(small_config(tmp_path, shared_data / "levir_cd")).fit(until=until)
    assert not list(tmp_path.iterdir())


def _outputs(work_dir) -> dict:
    return {name: (work_dir / name).read_bytes() for name in ("last.pt", "best.safetensors", "results.json")}


def test_a_fresh_run_into_a_work_dir_holding_a_run_is_refused(shared_data, tmp_path, capsys):
    """It removed the earlier run's checkpoint, package and results before its first iteration: a run that then
    failed (diverged, a corrupt image) had destroyed a finished one."""
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(small_config(tmp_path / "run", shared_data / "levir_cd")))
    assert trainer_cli(["train", str(config)]) == 0
    finished = _outputs(tmp_path / "run")
    capsys.readouterr()
    assert trainer_cli(["train", str(config), "--set", "optim.lr=1e30"]) == 2
    assert capsys.readouterr().err.endswith(
        f"geochange: error: {tmp_path / 'run'}: holds an earlier run (last.pt, best.safetensors, results.json); "
        "continue it with --resume, replace it with --restart, or choose another work_dir\n")
    assert _outputs(tmp_path / "run") == finished
    assert trainer_cli(["train", str(config), "--restart", "--until", "1"]) == 0
    assert not (tmp_path / "run" / "results.json").exists()
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["iteration"] == 1


def test_a_resume_puts_back_the_best_package_of_its_checkpoint(shared_data, tmp_path):
    """A run killed after a validation wrote a new best and before the next checkpoint: the resumed run credited
    itself with a best its checkpoint knew nothing of."""
    cfg = small_config(tmp_path, shared_data / "levir_cd", schedule={"iterations": 3, "warmup": 1},
                       train={"val_interval": 1, "checkpoint_interval": 2})
    first = Trainer(cfg)
    assert first.fit(until=2) is None
    at_checkpoint = (tmp_path / "best.safetensors").read_bytes()
    first.iteration = 3  # the validation of iteration 3 saved a new best, then the run died
    save_package(first.module, first.manifest({"val": {"global": {"mIoU": 1.0}}}), tmp_path / "best.safetensors")
    assert Trainer(cfg).fit(resume=True, until=2) is None
    assert (tmp_path / "best.safetensors").read_bytes() == at_checkpoint


def test_a_resumed_run_drops_the_results_of_the_run_it_extends(shared_data, tmp_path):
    """export read the finished run's figures from results.json while the extended run had not finished."""
    Trainer(small_config(tmp_path, shared_data / "levir_cd")).fit()
    assert (tmp_path / "results.json").exists()
    extended = small_config(tmp_path, shared_data / "levir_cd", schedule={"iterations": 3})
    assert Trainer(extended).fit(resume=True, until=2) is None
    assert not (tmp_path / "results.json").exists()


def test_a_second_run_into_a_work_dir_is_refused(shared_data, tmp_path):
    """Two runs into one work_dir interleaved their logs, checkpoints and packages."""
    cfg = small_config(tmp_path, shared_data / "levir_cd")
    with folder_lock(tmp_path), pytest.raises(OutputError, match="another GeoChange run is writing its outputs"):
        Trainer(cfg).fit()
    assert not list(tmp_path.iterdir())


def test_a_killed_run_s_temporaries_are_removed(shared_data, tmp_path):
    """A SIGKILL while a checkpoint or package was written left its temporary there for ever."""
    left = [tmp_path / ".last.0123abcd.partial.pt", tmp_path / ".best.89abcdef.partial.safetensors",
            tmp_path / ".results.00000000.partial.json"]
    for path in left:
        path.write_bytes(b"cut short")
    assert Trainer(small_config(tmp_path, shared_data / "levir_cd")).fit(until=1) is None
    assert not [path for path in left if path.exists()]
