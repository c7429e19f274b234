"""Trainer configs: every shipped experiment parses with the papers' settings; errors name the key;
overrides; Open-CD's per-parameter multipliers and the learning-rate schedule."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch.nn as nn

from geochange.engine.inputs import optical_input
from geochange.trainer.config import ConfigError, derive, load, validate
from geochange.trainer.mtkd import DEFAULT_LAMBDA
from geochange.trainer.optim import lr_factor, param_groups, unmatched_multipliers

CONFIG_DIR = Path(__file__).resolve().parents[1] / "trainer" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
MINIMAL = {"name": "x", "model": {"architecture": "tinycd"}, "data": {"datasets": [{"root": "d", "layout": 1}]}}


def test_the_issue_s_experiments_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"m2cd_mit_b0_cau", "m2cd_mit_b0_o2sp_cau", "sscfnet_r50_levir", "changer_mit_b0_jl1",
            "tinycd_levir", "mtkd_changer_mit_b0_jl1"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_parses(path):
    cfg = load(path)
    assert cfg["name"] == path.stem
    # Full paper schedules, not smoke settings; the OMBRIA zoo recipes are scaled to a 2-core CPU (~90 min).
    assert cfg["schedule"]["iterations"] >= (400 if path.stem.endswith("_ombria") else 89000)
    if cfg["data"]["optical_sar"]:
        assert cfg["augment"]["exchange"] == 0


def test_papers_settings():
    moe, o2sp = load(CONFIG_DIR / "m2cd_mit_b0_cau.yaml"), load(CONFIG_DIR / "m2cd_mit_b0_o2sp_cau.yaml")
    assert moe["loss"]["o2sp"] == 0 and o2sp["loss"]["o2sp"] == 1e-4
    assert o2sp["model"]["init"].endswith("m2cd_mit_b0_cau/best.safetensors")
    for cfg in (moe, o2sp):
        assert (cfg["optim"]["lr"], cfg["optim"]["weight_decay"], cfg["data"]["batch"]) == (1e-4, 0.01, 8)
        assert cfg["optim"]["lr_mult"] == {"head": 10.0}
        assert cfg["optim"]["decay_mult"] == {"norm": 0.0, "pos_block": 0.0}
        assert (cfg["schedule"]["warmup"], cfg["schedule"]["warmup_start"], cfg["schedule"]["decay"]) == \
            (1000, 1e-6, "poly")
        assert cfg["loss"]["ohem"] == {"thresh": 0.7, "min_kept": 100000}
        assert cfg["augment"]["rotate"]["degrees"] == 20 and cfg["augment"]["crop"]["cat_max_ratio"] == 0.75
    sscf = load(CONFIG_DIR / "sscfnet_r50_levir.yaml")
    assert (sscf["optim"]["name"], sscf["optim"]["lr"], sscf["optim"]["momentum"],
            sscf["optim"]["weight_decay"], sscf["schedule"]["decay"]) == ("sgd", 0.01, 0.9, 5e-4, "cosine")
    assert sscf["loss"]["aux_weight"] == 0.5 and sscf["loss"]["ohem"] is None
    # ImageNet ResNets from local files (the authors' framework's --pretrained); tested without TTA.
    for arch, weights in (("r50", "resnet50"), ("rx50", "resnext50_32x4d"), ("r101", "resnet101")):
        cfg = load(CONFIG_DIR / f"sscfnet_{arch}_levir.yaml")
        assert cfg["model"]["backbone_weights"] == f"weights/{weights}.pth" and cfg["test"]["tta"] is False
    # TinyCD's authors start from torchvision's ImageNet EfficientNet-B4 (their Open-CD port too).
    for name in ("tinycd_levir", "mtkd_tinycd_jl1"):
        assert load(CONFIG_DIR / f"{name}.yaml")["model"]["backbone_weights"] == "weights/efficientnet_b4.pth"
    # The authors' ConvNeXt M2CD starts from random weights (pretrained=None, no init_cfg).
    convnext = load(CONFIG_DIR / "m2cd_convnext_t_cau.yaml")
    assert convnext["model"]["backbone_weights"] is None and convnext["model"]["init"] is None
    assert (convnext["optim"]["lr"], convnext["optim"]["weight_decay"], convnext["schedule"]["iterations"]) == \
        (1e-3, 0.05, 400000)
    # M2CD's MoE stage cannot exchange an optical and a SAR date (the authors' does, p 0.5: declared in the
    # README); the M2CD paper tests with TTA.
    assert moe["augment"]["exchange"] == 0 and moe["test"]["tta"] is True
    mtkd = load(CONFIG_DIR / "mtkd_changer_mit_b0_jl1.yaml")
    assert mtkd["mtkd"]["thresholds"] == [0.05, 0.2] and mtkd["mtkd"]["lambda"] == 1e-4
    assert mtkd["mtkd"]["distill"]["schedule"]["iterations"] == 100000
    assert mtkd["augment"]["crop"]["size"] == 512 and mtkd["augment"]["exchange"] == 0.5
    # TinyCD's distillation weight is the authors' code's (5e-3), not the paper's Table II (1e-5).
    tiny = load(CONFIG_DIR / "mtkd_tinycd_jl1.yaml")
    assert tiny["mtkd"]["lambda"] == 5e-3 == DEFAULT_LAMBDA["tinycd"]
    # The JL1-CD paper and the authors' test scripts use no test-time augmentation.
    for name in ("changer_mit_b0_jl1", "changer_mit_b1_jl1", "mtkd_changer_mit_b0_jl1", "mtkd_tinycd_jl1"):
        assert load(CONFIG_DIR / f"{name}.yaml")["test"]["tta"] is False, name


def test_errors_name_every_bad_key():
    raw = {"name": "x", "model": {"architecture": "tinycd"},
           "data": {"datasets": [{"root": "d"}], "batch": "two"},
           "optim": {"lrr": 1e-3}, "augment": {"exchange": 2, "blur": {"kernels": [3, 7]},
                                               "rotate": {"padding": "wrap"}},
           "train": {"checkpoint_interval": 0}, "test": {"scales": [0.75, "big"]}}
    with pytest.raises(ConfigError) as e:
        validate(raw)
    text = str(e.value)
    assert "data.batch: expected int, got 'two'" in text
    assert "optim.lrr: unknown key (did you mean 'lr'?)" in text
    assert "augment.exchange: must be between 0 and 1" in text
    assert "augment.blur.kernels: must be a non-empty list of kernel sizes among [3, 5]" in text
    assert "augment.rotate.padding: must be one of constant, reflect" in text
    # Found here, not by a division by zero at the first step or by the test after the whole schedule.
    assert "train.checkpoint_interval: must be positive (got 0)" in text
    assert "test.scales: must be a non-empty list of scales in (0, 4] (got [0.75, 'big'])" in text
    with pytest.raises(ConfigError, match="model.architecture: unknown architecture"):
        validate({**MINIMAL, "model": {"architecture": "nope"}, "data": {"datasets": [{"root": "d"}]}})
    with pytest.raises(ConfigError, match="data.datasets.0.layout: unknown key"):
        validate(MINIMAL)
    with pytest.raises(ConfigError, match="exchanged in an optical-SAR pair"):
        validate({**MINIMAL, "data": {"datasets": [{"root": "d"}], "optical_sar": True},
                  "augment": {"exchange": 0.5}})
    with pytest.raises(ConfigError, match="mtkd.distill makes schedule.iterations: must be positive"):
        validate({**MINIMAL, "data": {"datasets": [{"root": "d"}]},
                  "mtkd": {"distill": {"schedule": {"iterations": 0}}}})


def test_dates_of_different_kinds_are_not_exchanged_whatever_optical_sar_says():
    """M2CD's post date is SAR: exchanged with the optical pre date, each would be read with the other's spec."""
    with pytest.raises(ConfigError, match=r"augment.exchange: the pre date is 3-band optical uint8 \(scale 255.0\) "
                                          r"and the post date 1-band sar uint8 \(scale 255.0\), as m2cd_mit_b0's "
                                          r"input spec says: dates of different kinds cannot be exchanged"):
        validate({**MINIMAL, "model": {"architecture": "m2cd_mit_b0"}, "data": {"datasets": [{"root": "d"}]},
                  "augment": {"exchange": 0.5}})
    inputs = {"pre": optical_input(4, 10000.0, "uint16"), "post": optical_input(3, 10000.0, "uint16")}
    with pytest.raises(ConfigError, match=r"the pre date is 4-band optical uint16 \(scale 10000.0\) and the post "
                                          r"date 3-band optical uint16 \(scale 10000.0\), as data.inputs says"):
        validate({**MINIMAL, "data": {"datasets": [{"root": "d"}], "inputs": inputs}, "augment": {"exchange": 0.5}})
    assert validate({**MINIMAL, "model": {"architecture": "m2cd_mit_b0"}, "data": {"datasets": [{"root": "d"}]}})
    assert validate({**MINIMAL, "data": {"datasets": [{"root": "d"}], "inputs": {**inputs, "pre": inputs["post"]}},
                     "augment": {"exchange": 0.5}})


def test_overrides_and_yaml_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    # PyYAML reads 1e-4 without a dot as a string; the config accepts it as the number it means.
    path.write_text("name: c\nmodel: {architecture: tinycd}\noptim: {lr: 1e-4}\n"
                    "data: {datasets: [{root: a}, {root: b}]}\n")
    cfg = load(path, ["data.datasets.1.root=/elsewhere", "schedule.iterations=2e3", "optim.betas=[0.9, 0.99]"])
    assert cfg["optim"]["lr"] == 1e-4
    assert cfg["data"]["datasets"][1]["root"] == "/elsewhere"
    assert cfg["schedule"]["iterations"] == 2000 and isinstance(cfg["schedule"]["iterations"], int)
    assert cfg["optim"]["betas"] == [0.9, 0.99]
    assert cfg["work_dir"] == "runs/c" and cfg["train"]["checkpoint_interval"] == cfg["train"]["val_interval"]
    # YAML 1.1 reads an unquoted off as false: amp's "off" all the same.
    assert load(path, ["train.amp=off"])["train"]["amp"] == "off"
    with pytest.raises(ConfigError, match="train.amp: expected str, got True"):
        load(path, ["train.amp=on"])
    with pytest.raises(ConfigError, match="not an index"):
        load(path, ["data.datasets.5.root=x"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load(path, ["data.batch"])


def test_a_derived_config_s_checkpoints_follow_its_own_validation():
    """MTKD's teachers and student validate at their own interval; the best weights are kept at checkpoints."""
    base = validate({"name": "x", "model": {"architecture": "tinycd"}, "data": {"datasets": [{"root": "d"}]},
                     "train": {"val_interval": 5000}})
    assert derive(base, {"train": {"val_interval": 1000}})["train"]["checkpoint_interval"] == 1000
    assert derive(base, {"train": {"val_interval": 1000, "checkpoint_interval": 3000}})["train"][
        "checkpoint_interval"] == 3000
    given = derive(base, {"train": {"checkpoint_interval": 2500}})
    assert derive(given, {"train": {"val_interval": 1000}})["train"]["checkpoint_interval"] == 2500  # chosen: kept


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm(4))
        self.backbone.pos_block = nn.Conv2d(4, 4, 1)
        self.head = nn.Module()
        self.head.conv = nn.Conv2d(4, 2, 1)
        self.head.norm = nn.BatchNorm2d(2)


def test_param_groups_follow_mmengine_custom_keys():
    model = _Toy()
    groups = param_groups(model, lr=1e-4, weight_decay=0.01, lr_mult={"head": 10.0},
                          decay_mult={"norm": 0.0, "pos_block": 0.0})
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert setting[id(named["backbone.0.weight"])] == (1e-4, 0.01)
    assert setting[id(named["backbone.pos_block.weight"])] == (1e-4, 0.0)
    # "head" (4 letters) sorts before "norm": a head norm keeps its decay, as in the authors' runs.
    assert setting[id(named["head.norm.weight"])] == pytest.approx((1e-3, 0.01))
    assert setting[id(named["head.conv.bias"])] == pytest.approx((1e-3, 0.01))
    # backbone.1 is a LayerNorm whose name holds no "norm": mmengine matches names, not types.
    assert setting[id(named["backbone.1.weight"])] == (1e-4, 0.01)
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_learning_rate_schedule():
    poly = {"iterations": 200000, "warmup": 1000, "warmup_start": 1e-6, "decay": "poly", "power": 1.0}
    assert lr_factor(0, poly) == 1e-6
    assert lr_factor(500, poly) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert lr_factor(1000, poly) == 1.0
    assert lr_factor(100500, poly) == pytest.approx(0.5)
    assert lr_factor(200000, poly) == 0.0
    cosine = {**poly, "warmup": 0, "decay": "cosine", "iterations": 100}
    assert lr_factor(0, cosine) == 1.0 and lr_factor(50, cosine) == pytest.approx(0.5)
    assert lr_factor(100, cosine) == pytest.approx(0.0)


def test_values_that_would_fail_in_training_or_detection_are_named_before():
    """Each was accepted and then trained backwards (clip_grad), crashed at the first step or in the model's
    constructor, or made a package that detect refuses with its default overlap (a 64 px tile)."""
    with pytest.raises(ConfigError) as e:
        validate({**MINIMAL, "data": {"datasets": [{"root": "d"}]}, "seed": -1, "augment": {"crop": {"size": 64}},
                  "optim": {"clip_grad": -1.0, "betas": [0.9, 1.5]}})
    text = str(e.value)
    assert "seed: must be >= 0 (got -1)" in text
    assert "optim.clip_grad: must be positive (got -1.0)" in text
    assert "optim.betas: must be [beta1, beta2], each in [0, 1) (got [0.9, 1.5])" in text
    assert "augment.crop.size: must be at least 65: it becomes the package's tile, which detect's default " \
           "overlap (64 px) must stay under (got 64)" in text
    assert validate({**MINIMAL, "data": {"datasets": [{"root": "d"}]}, "optim": {"clip_grad": None}})
    pair = {"pre": "a.tif", "post": "b.tif", "label": "c.tif", "split": {"val": 0.1}}
    with pytest.raises(ConfigError) as e:
        validate({**MINIMAL, "data": {"datasets": [{**pair, "bands": {"pre": [1], "after": [1]}},
                                                   {**pair, "bands": {"pre": [0, 1, 2]}}]}})
    text = str(e.value)
    assert "data.datasets.0.bands: must map pre and/or post to lists of band numbers" in text
    assert "data.datasets.1.bands.pre: must be a non-empty list of band numbers from 1, got [0, 1, 2]" in text
    with pytest.raises(ConfigError) as e:
        validate({**MINIMAL, "data": {"datasets": [{"root": "d"}]}, "augment": {"crop": {"size": 100}},
                  "model": {"architecture": "tinycd", "kwargs": {"depth": 3}}})
    text = str(e.value)
    assert "model.kwargs: tinycd: got an unexpected keyword argument 'depth' (its arguments: in_chans)" in text
    assert "augment.crop.size: tinycd trains on sides divisible by 8 (got 100)" in text
    assert validate({**MINIMAL, "data": {"datasets": [{"root": "d"}]}, "model": {"architecture": "changer_mit_b0"},
                     "augment": {"crop": {"size": 100}}})


def test_multipliers_that_match_no_parameter_are_said():
    assert unmatched_multipliers(_Toy(), {"lr_mult": {"head": 10.0, "haed": 10.0}, "decay_mult": {"norm": 0.0}}) \
        == ["optim.lr_mult.haed: in no parameter name of the model, so it changes nothing"]


def test_the_loader_workers_fit_the_machine(monkeypatch, tmp_path):
    """Four data-loader workers ran on a two-core machine, beside the training (torch warns that the loader may run
    slow or freeze there): the default is now the cores this process may use besides its own, at most four."""
    from dask import system

    from geochange.trainer.config import default_loader_workers

    for cores, expected in ((1, 0), (2, 1), (4, 3), (16, 4)):
        monkeypatch.setattr(system, "CPU_COUNT", cores)
        assert default_loader_workers() == expected
    monkeypatch.undo()
    config = tmp_path / "mine.yaml"  # as QGIS's dialog writes one: no loader workers given
    config.write_text(f"name: mine\nmodel: {{architecture: tinycd}}\ndata:\n  datasets: [{{root: {tmp_path}}}]\n")
    assert load(config)["data"]["workers"] == default_loader_workers()
    assert load(config, ["data.workers=3"])["data"]["workers"] == 3


def test_a_config_not_in_utf8_and_infinite_rates_are_refused_by_name(tmp_path):
    """A Latin-1 config raised UnicodeDecodeError; ``optim.lr: .inf`` (YAML's infinity) passed and trained on NaN."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\nmodel: {architecture: tinycd}\ndata: {datasets: [{root: d}]}\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: not a text file in UTF-8 .*; save the config as UTF-8"):
        load(path)
    path.write_text("name: x\nmodel: {architecture: tinycd}\ndata: {datasets: [{root: d}]}\n"
                    "optim: {lr: .inf, weight_decay: .nan}\n")
    with pytest.raises(ConfigError) as e:
        load(path)
    assert "optim.lr: must be a finite number (got inf)" in str(e.value)
    assert "optim.weight_decay: must be a finite number (got nan)" in str(e.value)
    with pytest.raises(ConfigError, match=r"optim.weight_decay: must be a finite number \(got inf\)"):
        load(path, ["optim.lr=0.001", "optim.weight_decay=.inf"])
    # An int past a float's range is finite (the check raised OverflowError); MTKD's weight must be >= 0 and finite.
    assert load(path, ["optim.lr=0.001", "optim.weight_decay=0", "seed=1" + "0" * 400])["seed"] == 10 ** 400
    for weight, why in (("-1", "must be >= 0"), (".inf", "must be a finite number")):
        with pytest.raises(ConfigError, match=f"mtkd.lambda: {why}"):
            load(CONFIG_DIR / "mtkd_tinycd_jl1.yaml", [f"mtkd.lambda={weight}"])
