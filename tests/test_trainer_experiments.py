"""Learning on real pixels (``python scripts/experiments.py``): the measured acceptance of the
issue. Each experiment takes minutes to tens of minutes on a CPU: marked slow and run only when
GEOCHANGE_SLOW=1 (e.g. ``GEOCHANGE_SLOW=1 pytest -m slow tests/test_trainer_experiments.py``); the
pipelines themselves are covered quickly by the other trainer tests."""
from __future__ import annotations

import importlib.util
import os

import pytest

from conftest import REPO

# scripts/ is no package (it stays out of the plugin and the installed package): loaded from its file.
_spec = importlib.util.spec_from_file_location("experiments", REPO / "scripts" / "experiments.py")
experiments = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(experiments)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("GEOCHANGE_SLOW") != "1", reason="long CPU run; set GEOCHANGE_SLOW=1")]


def test_finetuning_tinycd_raises_dsifn_and_keeps_levir(shared_data, tmp_path):
    _, figures = experiments.finetune(shared_data, tmp_path, 1.0)
    dsifn, levir = figures["dsifn, test split"], figures["levir_cd, test split"]
    assert dsifn["after"]["f1"] > dsifn["before"]["f1"]
    assert abs(levir["after"]["f1"] - levir["before"]["f1"]) <= 0.03


def test_m2cd_with_o2sp_learns_on_ombria(shared_data, tmp_path):
    _, figures = experiments.o2sp(shared_data, tmp_path, 1.0)
    curve = figures["loss_curve"]
    assert curve[-1][1] < curve[0][1]
    assert figures["test"]["mIoU"] > figures["all_no_change"]["mIoU"]


def test_mtkd_end_to_end_with_tinycd(shared_data, tmp_path):
    _, figures = experiments.mtkd(shared_data, tmp_path, 1.0)
    for name in ("original", "o-p", "student"):
        assert 0 < figures[name]["global"]["mIoU"] <= 1
    assert (tmp_path / "mtkd_tinycd" / "router.safetensors").is_file()
