"""On a CUDA GPU (skipped without one; run on a lent GPU, figures in the README): the engine in bf16 and
fp16 autocast gives the authors' TinyCD predictions, a real CUDA out-of-memory halves the batch, every
model runs in autocast with channels_last, CUDA-graph replay equals eager, the trainer trains with AMP,
and torchrun ranks sharing the GPU give the one-process outputs. SyncBN over NCCL needs two GPUs and is
not covered here."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from geochange.engine.detect import detect
from geochange.engine.manifest import make_manifest
from geochange.engine.metrics import confusion, scores
from geochange.engine.models import create, list_models
from geochange.engine.package import ModelPackage
from geochange.engine.predictor import Predictor
from geochange.trainer.loop import Trainer
from trainer_setup import small_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def outputs(folder):
    return {"probability": folder / "p.tif", "mask": folder / "m.tif", "polygons": folder / "c.gpkg"}


def read(path):
    with rasterio.open(path) as src:
        return src.read(1)


@pytest.fixture(scope="module")
def cpu_reference(tinycd_package, shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cpu")
    tile = shared_data / "levir_tile_georef"
    detect(tile / "pre.tif", tile / "post.tif", tinycd_package, **outputs(out), device="cpu")
    return read(out / "p.tif"), read(tile / "label.tif") > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_detect_in_autocast_agrees_with_cpu(precision, cpu_reference, tinycd_package, shared_data, tmp_path):
    tile = shared_data / "levir_tile_georef"
    result = detect(tile / "pre.tif", tile / "post.tif", tinycd_package, **outputs(tmp_path), device="cuda",
                    precision=precision, batch=8)
    cpu_prob, label = cpu_reference
    prob = read(result.probability)
    assert scores(confusion(prob > 0.5, label))["f1"] >= 0.92  # as on the CPU (tests/test_detect.py)
    assert np.abs(prob - cpu_prob).mean() < 0.01
    assert ((prob > 0.5) == (cpu_prob > 0.5)).mean() > 0.995


def test_real_out_of_memory_halves_the_batch():
    torch.manual_seed(0)
    package = ModelPackage(create("m2cd_mit_b0").eval(), make_manifest("m2cd_mit_b0"))
    rng = np.random.default_rng(0)
    pre = rng.integers(0, 255, (32, 3, 512, 512), dtype=np.uint8)
    post = rng.integers(0, 255, (32, 1, 512, 512), dtype=np.uint8)
    logged = []
    predictor = Predictor(package, "cuda", precision="fp32", log=logged.append)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    one_by_one = np.concatenate([predictor(pre[i:i + 1], post[i:i + 1]) for i in range(0, 32, 8)])
    per_window = torch.cuda.max_memory_allocated() - before
    # A GPU that holds what is there now and about four windows' worth more: 32 windows cannot fit.
    limit = torch.cuda.memory_reserved() + 4 * per_window
    torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(0).total_memory)
    try:
        probs = predictor(pre, post)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert predictor.max_batch is not None and 1 <= predictor.max_batch < 32
    halvings = [m for m in logged if m.startswith("CUDA out of memory")]
    assert halvings and halvings[0].startswith("CUDA out of memory with a batch of 32 windows")
    np.testing.assert_allclose(probs[::8], one_by_one, atol=2e-3)


@pytest.mark.parametrize("name", list_models())
def test_every_model_in_bf16_channels_last_stays_close_to_fp32(name):
    torch.manual_seed(0)
    package = ModelPackage(create(name).eval(), make_manifest(name))
    rng = np.random.default_rng(0)
    pre, post = (rng.integers(0, 255, (2, package.manifest["inputs"][d]["bands"], 256, 256), dtype=np.uint8)
                 for d in ("pre", "post"))
    half = Predictor(package, "cuda", precision="bf16")(pre, post)
    assert half.shape == (2, 256, 256) and np.isfinite(half).all()
    full = Predictor(package, "cuda", precision="fp32")(pre, post)
    assert np.abs(half - full).mean() < 0.02


@pytest.mark.parametrize("architecture, amp", [("tinycd", "bf16"), ("tinycd", "fp16"), ("m2cd_mit_b0", "bf16")])
def test_trainer_with_amp_on_cuda(architecture, amp, shared_data, tmp_path):
    dataset, extra = ("ombria", {"loss": {"o2sp": 1e-4}, "data": {"optical_sar": True}}) \
        if architecture.startswith("m2cd") else ("levir_cd", {})
    cfg = small_config(tmp_path / "run", shared_data / dataset, architecture, device="cuda", train={"amp": amp},
                       **extra)
    trainer = Trainer(cfg)
    assert trainer.device.type == "cuda" and trainer.scaler.is_enabled() == (amp == "fp16")
    results = trainer.fit()
    assert np.isfinite(results["test"]["global"]["mIoU"])
    assert (tmp_path / "run" / "best.safetensors").is_file()


def test_two_ranks_on_one_gpu_equal_one_process(tinycd_package, shared_data, one_and_two_ranks):
    tile = shared_data / "levir_tile_georef"
    args = [str(tile / "pre.tif"), str(tile / "post.tif"), "--model", str(tinycd_package), "--tile", "256",
            "--overlap", "32", "--batch", "4", "--device", "auto", "--precision", "fp32"]
    one_dir, two_dir = one_and_two_ranks(args)
    # Each process tunes its own convolution algorithms (TF32 on the GPU): equal within their rounding.
    two, one = read(two_dir / "change_probability.tif"), read(one_dir / "change_probability.tif")
    np.testing.assert_allclose(two, one, atol=1e-2)
    assert ((two > 0.5) == (one > 0.5)).mean() > 0.999
    np.testing.assert_array_equal(read(two_dir / "change_mask.tif") == 255, two > 0.5)


@pytest.mark.parametrize("name", ["tinycd", "sscfnet_r50", "m2cd_mit_b0", "m2cd_convnext_t"])
def test_cuda_graph_replay_equals_eager(name):
    torch.manual_seed(0)
    package = ModelPackage(create(name).eval(), make_manifest(name))
    rng = np.random.default_rng(0)
    batches = [[rng.integers(0, 255, (4, package.manifest["inputs"][d]["bands"], 256, 256), dtype=np.uint8)
                for d in ("pre", "post")] for _ in range(2)]
    logged = []
    graphed = Predictor(package, "cuda", precision="bf16", log=logged.append)
    eager = Predictor(package, "cuda", precision="bf16", cuda_graphs=False)
    for pre, post in batches:  # the first call captures, the second replays on new pixels
        np.testing.assert_allclose(graphed(pre, post), eager(pre, post), atol=2e-3)
    # M2CD-ConvNeXt's routing sizes its expert groups on the host: no graph, a note, the same results.
    # (M2CD-MiT runs every expert on a GPU, in shapes free of the routing: see MixtureOfExperts._mix_all.)
    eager_only = name == "m2cd_convnext_t"
    assert graphed.cuda_graphs == (not eager_only)
    assert bool(logged) == eager_only and all("runs eagerly" in m for m in logged)
