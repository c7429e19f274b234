"""Tiling is seamless: a translation-equivariant model gives the whole-image result tile by tile."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geochange.engine.blending import blend_weights
from geochange.engine.stream import predict_plan
from geochange.engine.windows import WindowPlan

torch.manual_seed(0)
KERNELS = [torch.randn(4, 6, 3, 3), torch.randn(1, 4, 3, 3)]  # two 3x3 convs: receptive radius 2


def toy_model(pre: np.ndarray, post: np.ndarray, valid=None) -> np.ndarray:
    """Translation-equivariant (zero-padded convolutions), so any window of the input gives the
    matching window of the output, except within 2 px of the window's border."""
    x = torch.from_numpy(np.concatenate([pre, post], axis=1)).double()
    x = torch.tanh(F.conv2d(x, KERNELS[0].double(), padding=1))
    return torch.sigmoid(F.conv2d(x, KERNELS[1].double(), padding=1))[:, 0].numpy()


@pytest.mark.parametrize("height,width,tile,overlap", [
    (200, 300, 64, 16),    # sizes not divisible by the stride
    (257, 129, 96, 32),
    (100, 100, 128, 16),   # raster smaller than one tile
    (70, 300, 64, 24),     # smaller than a tile in one axis only
    (160, 160, 40, 12),    # many small tiles
])
def test_tiled_equals_whole_image(height, width, tile, overlap):
    rng = np.random.default_rng(1)
    pre = rng.normal(size=(3, height, width))
    post = rng.normal(size=(3, height, width))
    whole = toy_model(pre[None], post[None])[0]
    plan = WindowPlan(height, width, tile, overlap)

    def read(window):
        rows, cols = window.toslices()
        return pre[:, rows, cols], post[:, rows, cols], np.ones((rows.stop - rows.start, cols.stop - cols.start), bool)

    tiled = predict_plan(toy_model, plan, read, batch=3)
    assert tiled.shape == (height, width)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)


def test_window_plan_covers_the_raster_flush_with_its_edges():
    plan = WindowPlan(1000, 700, 512, 64)
    assert plan.rows == [0, 448, 488] and plan.cols == [0, 188]
    covered = np.zeros((1000, 700), int)
    for window in plan.windows():
        assert window.height == 512 and window.width == 512
        covered[window.toslices()] += 1
    assert covered.min() >= 1


def test_weights_form_a_partition_of_unity_on_regular_overlaps():
    plan = WindowPlan(64 * 3 - 32, 64 * 4 - 48, 64, 16)  # every neighbour overlaps exactly 16 px
    total = np.zeros((plan.height, plan.width))
    for window in plan.windows():
        total[window.toslices()] += blend_weights(window, plan)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)


def test_plan_rejects_bad_sizes():
    with pytest.raises(ValueError, match="overlap"):
        WindowPlan(10, 10, 64, 64)
    with pytest.raises(ValueError, match="--tile must be at least"):
        WindowPlan(10, 10, 0, 0)
