"""Changer (ChangerEx, MiT-b0 / b1): size against the published figures, forward contract, building blocks."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from geochange.engine import models
from geochange.engine.models.changer import (ChannelExchange, ChangerEx, FlowDualAlignment,
                                             SpatialExchange, changer_mit_b0, changer_mit_b1, warp)
from geochange.engine.models.stats import count_gflops, count_params

# Published: M2CD Table I (params, GFLOPs at 256x256) and JL1-CD Table II (GFLOPs at 512x512).
PUBLISHED = {
    "changer_mit_b0": {"params_m": 3.457, "gflops_256": 1.741, "gflops_512": 8.523},
    "changer_mit_b1": {"params_m": 13.355, "gflops_256": 5.046, "gflops_512": 23.306},
}


@pytest.fixture(scope="module")
def b0() -> ChangerEx:
    torch.manual_seed(0)
    return changer_mit_b0().eval()


@pytest.fixture(scope="module")
def b1() -> ChangerEx:
    torch.manual_seed(0)
    return changer_mit_b1().eval()


_GFLOPS: dict[tuple[str, int], float] = {}


def _gflops(request, name: str, size: int) -> float:
    """``count_gflops`` of the module's model ``name``, counted once per size."""
    if (name, size) not in _GFLOPS:
        _GFLOPS[name, size] = count_gflops(request.getfixturevalue(name.rsplit("_", 1)[-1]), size)
    return _GFLOPS[name, size]


def _pair(size: int, batch: int = 1, chans: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(size)
    return torch.randn(batch, chans, size, size, generator=g), torch.randn(batch, chans, size, size, generator=g)


# ----------------------------------------------------------------------------- size
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_paper(name, request):
    model = request.getfixturevalue(name.rsplit("_", 1)[-1])
    published = PUBLISHED[name]["params_m"]
    measured = count_params(model) / 1e6
    assert abs(measured - published) / published < 0.02, (measured, published)
    # Exact to the thousand the tables print: the encoder is MiT parameter for parameter.
    assert round(measured, 3) == published


@pytest.mark.usefixtures("published_heads")
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_flops_within_10_percent_at_256(name, request):
    published = PUBLISHED[name]["gflops_256"]
    measured = _gflops(request, name, 256)
    assert abs(measured - published) / published < 0.10, (measured, published)


@pytest.mark.usefixtures("published_heads")
def test_flops_at_512_grow_faster_than_pixels(request):
    """JL1-CD's 8.523 G at 512 is the same count as M2CD's 1.741 G at 256: the spatial-reduction
    attention's products grow with tokens^2, so 4x the pixels cost ~4.9x the FLOPs."""
    g256, g512 = _gflops(request, "changer_mit_b0", 256), _gflops(request, "changer_mit_b0", 512)
    assert abs(g512 - 8.523) / 8.523 < 0.10, g512
    assert 4.5 < g512 / g256 < 5.2


class _MMEngineExtras(TorchDispatchMode):
    """What mmengine's ``get_model_complexity_info`` (fvcore's rules, used by Open-CD's get_flops.py) adds
    to the multiply-adds: layer norm 5 and instance norm 4 per element, eval batch norm 2 per element,
    bilinear resize and grid_sample 4 per output element. Open-CD counts the head's 1/4-resolution logits,
    so the final resize to the input size is left out."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.flops = size, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name == "native_layer_norm":
            self.flops += 5 * args[0].numel()
        elif name == "native_batch_norm":  # InstanceNorm2d runs as training-mode batch norm, no affine
            self.flops += (4 if args[5] else 2) * args[0].numel()
        elif name == "grid_sampler_2d" or (name == "upsample_bilinear2d" and out.shape[-1] != self.size):
            self.flops += 4 * out.numel()
        return out


@pytest.mark.usefixtures("published_heads")
@pytest.mark.parametrize("name,size", [("changer_mit_b0", 256), ("changer_mit_b0", 512),
                                       ("changer_mit_b1", 256)])
def test_published_flops_reproduced_with_mmengine_counting(name, size, request):
    model = request.getfixturevalue(name.rsplit("_", 1)[-1])
    extras = _MMEngineExtras(size)
    with torch.no_grad(), extras:
        model(*_pair(size))
    total = _gflops(request, name, size) + extras.flops / 1e9
    published = PUBLISHED[name][f"gflops_{size}"]
    assert abs(total - published) < 0.001 * published, (total, published)


# ----------------------------------------------------------------------------- forward contract
@pytest.mark.parametrize("size", [256, 512])
def test_eval_forward_shape(b0, size):
    with torch.no_grad():
        logits = b0(*_pair(size))
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (1, 2, size, size)
    assert torch.isfinite(logits).all()


def test_eval_forward_on_a_non_square_size_not_a_multiple_of_32(b0):
    pre, post = torch.randn(1, 3, 100, 124), torch.randn(1, 3, 100, 124)
    with torch.no_grad():
        assert b0(pre, post).shape == (1, 2, 100, 124)


def test_eval_forward_is_deterministic(b0):
    pre, post = _pair(256)
    with torch.no_grad():
        assert torch.equal(b0(pre, post), b0(pre, post))


@pytest.mark.parametrize("size", [256, 512])
def test_train_forward_returns_full_and_quarter_logits(size):
    torch.manual_seed(1)
    model = changer_mit_b0().train()
    out = model(*_pair(size))
    assert out["logits"].shape == (1, 2, size, size)
    assert out["logits_lowres"].shape == (1, 2, size // 4, size // 4)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(2)
    model = changer_mit_b0().train()
    pre, post = _pair(64, batch=2)
    target = torch.randint(0, 2, (2, 64, 64))
    torch.nn.functional.cross_entropy(model(pre, post)["logits"], target).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_b1_forward_shape(b1):
    with torch.no_grad():
        assert b1(*_pair(96)).shape == (1, 2, 96, 96)


def test_dates_are_not_interchangeable(b0):
    pre, post = _pair(64)
    with torch.no_grad():
        assert not torch.allclose(b0(pre, post), b0(post, pre))


def test_in_chans_changes_the_stem_only():
    model = changer_mit_b0(in_chans=4).eval()
    assert model.backbone.encoder.patch_embed.proj.in_channels == 4
    assert count_params(model) - count_params(changer_mit_b0()) == 32 * 7 * 7
    with torch.no_grad():
        assert model(*_pair(64, chans=4)).shape == (1, 2, 64, 64)


def test_registry_entries():
    for name, published in PUBLISHED.items():
        spec = models.spec(name)
        assert spec.activation == "softmax"
        assert [s["bands"] for s in spec.inputs] == [3, 3]
        assert all(s["modality"] == "optical" for s in spec.inputs)
        assert spec.paper["params_m"] == published["params_m"]
        assert spec.paper["gflops"] == published["gflops_256"]
        assert spec.paper["gflops_input"] == 256
        assert "JL1-CD" in spec.paper["accuracy"]
        json.dumps(spec.paper)
    assert isinstance(models.create("changer_mit_b0", in_chans=3, drop_path_rate=0.0), ChangerEx)


# ----------------------------------------------------------------------------- building blocks
def test_channel_exchange_swaps_even_channels():
    a, b = torch.zeros(1, 6, 2, 2), torch.ones(1, 6, 2, 2)
    out_a, out_b = ChannelExchange()(a, b)
    assert out_a[0, :, 0, 0].tolist() == [1, 0, 1, 0, 1, 0]
    assert out_b[0, :, 0, 0].tolist() == [0, 1, 0, 1, 0, 1]


def test_spatial_exchange_swaps_even_columns():
    a, b = torch.zeros(1, 2, 3, 5), torch.ones(1, 2, 3, 5)
    out_a, out_b = SpatialExchange()(a, b)
    assert out_a[0, 1, 2].tolist() == [1, 0, 1, 0, 1]
    assert torch.equal(out_a + out_b, torch.ones_like(a))
    assert torch.equal(out_a[:, :, 0], out_a[:, :, 2])  # rows untouched


def test_warp_with_zero_flow_is_identity():
    x = torch.randn(2, 3, 7, 9)
    assert torch.allclose(warp(x, torch.zeros(2, 2, 7, 9)), x, atol=1e-6)


def test_warp_flow_unit_is_half_a_grid_step():
    """Open-CD divides the flow by W (and H), so a flow of 2W/(W-1) moves by exactly one pixel."""
    h, w = 4, 6
    x = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    flow = torch.zeros(1, 2, h, w)
    flow[:, 0] = 2 * w / (w - 1)
    moved = warp(x, flow)
    assert torch.allclose(moved[..., :-1], x[..., 1:], atol=1e-4)
    assert torch.allclose(moved[..., -1], torch.zeros(1, 1, h), atol=1e-4)  # sampled outside: zero padding


def test_flow_alignment_output_is_both_differences():
    fdaf = FlowDualAlignment(8).eval()
    torch.nn.init.zeros_(fdaf.flow[-1].weight)  # no flow: plain differences
    x1, x2 = torch.randn(1, 8, 5, 5), torch.randn(1, 8, 5, 5)
    out = fdaf(x1, x2)
    assert out.shape == (1, 16, 5, 5)
    assert torch.allclose(out, torch.cat([x1 - x2, x2 - x1], dim=1), atol=1e-5)


def test_load_mit_backbone_weights(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model("pvt_v2_b0", pretrained=False, mlp_ratios=4)  # keeps its classifier
    torch.save(source.state_dict(), tmp_path / "mit_b0.pth")
    model = changer_mit_b0()
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    report = model.load_backbone_weights(tmp_path / "mit_b0.pth")
    assert report["dropped"] == ["head.bias", "head.weight"]
    for key, value in model.backbone.encoder.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key
    for key, value in model.head.state_dict().items():
        assert torch.equal(value, head_before[key]), key

    # timm's own PVT-v2 (MLP ratio 8 in stages 1-2) is not MiT and is refused.
    torch.save(timm.create_model("pvt_v2_b0", pretrained=False).state_dict(), tmp_path / "pvt.pth")
    with pytest.raises(ValueError, match="shape mismatches"):
        model.load_backbone_weights(tmp_path / "pvt.pth")


def test_encoder_is_mit_not_pvt_v2(b0):
    """timm's PVT-v2 has MLP ratio 8 in the first two stages; MiT (and Changer) has 4 everywhere."""
    for stage, width in zip(b0.backbone.encoder.stages, (32, 64, 160, 256)):
        assert stage.blocks[0].mlp.fc1.out_features == 4 * width
    assert math.isclose(count_params(b0.backbone) / 1e6, 3.319392)
