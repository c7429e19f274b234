"""Precision and runtime on the CPU: ``auto`` picks bf16 where the CPU computes it natively, and neither bf16
autocast in PyTorch nor the front ends' default path (precision and backend ``auto``: OpenVINO in bf16 on a CPU
with AVX512-BF16 where OpenVINO is installed) changes a model's accuracy: for every zoo model (OMBRIA's test
tiles) and the TinyCD authors' weights (the LEVIR-CD images), the change-class F1 within 0.002 of eager fp32
and the masks equal on at least 99.5 % of the pixels."""
from __future__ import annotations

import numpy as np
import pytest

from geochange.engine.backends import openvino_installed
from geochange.engine.evaluate import change_label, dataset_pairs, predict_image
from geochange.engine.hardware import cpu_bf16
from geochange.engine.metrics import ConfusionMeter
from geochange.engine.options import DetectOptions
from geochange.engine.package import load_package
from geochange.engine.predictor import Predictor
from geochange.engine.rasters import read_image
from geochange.engine.zoo import zoo_index


def test_auto_takes_bf16_where_the_cpu_computes_it_and_says_why():
    native, why = cpu_bf16()
    logged = []
    predictor = Predictor(load_package(sorted(zoo_index())[0]), "cpu", precision="auto", log=logged.append)
    assert str(predictor.dtype) == ("torch.bfloat16" if native else "torch.float32")
    assert logged == [f"precision {'bf16' if native else 'fp32'} on the CPU: {why}"]
    logged.clear()
    assert str(Predictor(predictor.package, "cpu", precision="fp16", log=logged.append).dtype) == "torch.float32"
    assert logged == ["precision fp32 on the CPU: fp16 is for GPUs"]


def masks_and_f1(package, folder, precision: str, backend: str, tiling) -> tuple[list[np.ndarray], float]:
    predictor, meter, masks = Predictor(package, "cpu", precision=precision, backend=backend), ConfusionMeter(), []
    if backend == "auto" and openvino_installed():  # the default path is OpenVINO's, not a fallback to eager
        assert predictor.backend == "openvino"
    for pre_path, post_path, label_path in dataset_pairs(folder):
        change, labelled = change_label(read_image(label_path)[0], label_path)
        masks.append(predict_image(predictor, read_image(pre_path), read_image(post_path), tiling) > package.threshold)
        meter.add(masks[-1], change, labelled)
    return masks, meter.summary()["global"]["f1"]


CASES = [pytest.param(name, "ombria_full/test", id=name) for name in sorted(zoo_index())] + [
    pytest.param(None, "levir_cd", id="tinycd_authors")]


# (precision, backend): bf16 autocast in PyTorch (the default without OpenVINO), and the default.
FAST_PATHS = [("bf16", "eager"), ("auto", "auto")]


@pytest.mark.parametrize("name, data", CASES)
def test_the_fast_paths_keep_the_accuracy_of_eager_fp32(name, data, shared_data, tinycd_package):
    package = load_package(name or tinycd_package)
    tiling = DetectOptions(tile=package.tile, overlap=64)  # as evaluate and detect run it
    full, f1_full = masks_and_f1(package, shared_data / data, "fp32", "eager", tiling)
    figures = {}
    for precision, backend in FAST_PATHS:
        fast, f1_fast = masks_and_f1(package, shared_data / data, precision, backend, tiling)
        agreement = sum(int((a == b).sum()) for a, b in zip(full, fast)) / sum(a.size for a in full)
        figures[precision, backend] = (f1_fast, agreement)
    assert all(abs(f1 - f1_full) <= 0.002 and agreement >= 0.995 for f1, agreement in figures.values()), \
        (f1_full, figures)
