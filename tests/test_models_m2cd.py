"""M2CD: published sizes, its mixtures' GPU path, the O2SP path, forward contracts, backbone weights (the
mixture of experts itself: test_models_moe.py)."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from geochange.engine.models import create, spec
from geochange.engine.models.heads import ConvBNReLU, fuse_resized
from geochange.engine.models.m2cd import ConvNeXtMoEBlock
from geochange.engine.models.moe import MixtureOfExperts
from geochange.engine.models.stats import count_gflops, count_params
from geochange.trainer.losses import o2sp_self_distillation_loss, simulate_sar_speckle

MIT = ("m2cd_mit_b0", "m2cd_mit_b1")
CONVNEXT = ("m2cd_convnext_t", "m2cd_convnext_s", "m2cd_convnext_b")
# Table I of the paper: params (M) with the SegFormer head, GFLOPs at 256 x 256 (multiply-adds).
TABLE_I = {"m2cd_mit_b0": (6.989, 6.372), "m2cd_mit_b1": (26.481, 11.638),
           "m2cd_convnext_t": (157.224, 22.182), "m2cd_convnext_s": (158.281, 39.020),
           "m2cd_convnext_b": (280.240, 65.531)}

# Large models at 256 x 256 and batch 1: run by default, selectable with -m "not heavy".
heavy = pytest.mark.heavy


@pytest.fixture(scope="module")
def mit_models():
    torch.manual_seed(0)
    return {name: create(name) for name in MIT}


def _pair(size: int = 256, batch: int = 1, channels: int = 3):
    return torch.randn(batch, channels, size, size), torch.randn(batch, channels, size, size)


def _check_forward(model, size: int, batch: int = 1, train: bool = True):
    pre, post = _pair(size, batch)
    model.eval()
    with torch.no_grad():
        logits = model(pre, post)
    assert logits.shape == (batch, 2, size, size)
    assert torch.isfinite(logits).all()
    if not train:
        return
    model.train()
    with torch.no_grad():
        out = model(pre, post)
    assert set(out) == {"logits", "gate_loss"}
    assert out["logits"].shape == (batch, 2, size, size)
    assert out["gate_loss"].dim() == 0 and out["gate_loss"] > 0
    model.eval()


# --- Published sizes ------------------------------------------------------------------------------

def _authors_unused_mlp_params(model) -> int:
    """The dense MLP (Linear C->4C, Linear 4C->C) the authors' ConvNeXt MoE block builds but never calls."""
    total = 0
    for module in model.modules():
        if isinstance(module, ConvNeXtMoEBlock):
            c = module.gamma.numel()
            total += 2 * c * 4 * c + 4 * c + c
    return total


@pytest.mark.parametrize("name", MIT + CONVNEXT)
def test_parameter_counts_match_table_i(name):
    with torch.device("meta"):  # counted without allocating ConvNeXt-B's 233 M parameters
        model = create(name)
    params = count_params(model)
    published = TABLE_I[name][0] * 1e6
    assert spec(name).paper["params_m"] == TABLE_I[name][0]
    # Equal to the table's last digit (half a thousandth of a million: 7e-5 of MiT-b0, 3e-6 of the rest).
    if name in MIT:
        assert abs(params - published) <= 500, params
    else:
        # Table I counts the dense MLP the authors' MoE blocks keep unused; this model leaves it out.
        unused = _authors_unused_mlp_params(model)
        assert unused > 0.09 * published
        assert abs(params + unused - published) <= 500, (params, unused)


@pytest.mark.usefixtures("published_heads")
@pytest.mark.parametrize("name", MIT)
def test_gflops_match_table_i(mit_models, name):
    gflops = count_gflops(mit_models[name], size=256)
    assert abs(gflops / TABLE_I[name][1] - 1) < 0.10, gflops
    assert spec(name).paper["gflops"] == TABLE_I[name][1]
    assert spec(name).paper["gflops_input"] == 256


def test_registry_entries():
    for name in MIT + CONVNEXT:
        s = spec(name)
        assert s.activation == "softmax"
        assert s.inputs[0]["modality"] == "optical" and s.inputs[1]["modality"] == "sar"
        assert s.inputs[1]["replicate"] == 3


# --- Mixture of experts ---------------------------------------------------------------------------

def test_every_expert_path_equals_the_sparse_mixture_and_has_no_gating_dependent_shape(mit_models):
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    torch.manual_seed(0)
    moe = MixtureOfExperts(16, num_experts=4, top_k=2).eval()
    tokens = torch.randn(300, 16)
    with torch.no_grad():
        routing = moe.gate_tokens(tokens)
        torch.testing.assert_close(moe._mix_all(tokens, routing), moe._mix(tokens, routing), rtol=1e-6, atol=1e-6)
        bias = moe.experts[0].fc2.bias.clone()
        moe.experts[0].fc2.bias.fill_(float("inf"))  # as an fp16 overflow: only its own tokens see it
        torch.testing.assert_close(moe._mix_all(tokens, routing), moe._mix(tokens, routing), rtol=1e-6, atol=1e-6)
        assert (routing.indices != 0).all(dim=1).any() and moe._mix(tokens, routing).isinf().any()
        moe.experts[0].fc2.bias.copy_(bias)

    # CUDA graph capture needs what fullgraph tracing needs here: no shape that depends on values.
    def traced(model):
        torch._dynamo.reset()
        return torch.compile(model, fullgraph=True, backend="eager")

    with torch.no_grad():
        with pytest.raises(GuardOnDataDependentSymNode):
            traced(lambda t: moe._mix(t, moe.gate_tokens(t)))(tokens)
        traced(lambda t: moe._mix_all(t, moe.gate_tokens(t)))(tokens)
        # Compiled, M2CD-MiT-b0's mixtures take every expert: the whole model traces as one graph.
        model, (pre, post) = mit_models["m2cd_mit_b0"].eval(), _pair(64)
        torch.testing.assert_close(traced(model)(pre, post), model(pre, post))
    assert all(m.every_expert_in_graphs for m in model.modules() if isinstance(m, MixtureOfExperts))
    assert not MixtureOfExperts(16).every_expert_in_graphs  # ConvNeXt's mixtures: sparse, eager


# --- O2SP -----------------------------------------------------------------------------------------

def test_o2sp_training_forward_returns_the_three_paths_features(mit_models):
    model = mit_models["m2cd_mit_b0"].train()
    pre, post = _pair(64, batch=2)
    sim = simulate_sar_speckle(pre, torch.Generator().manual_seed(0))
    out = model(pre, post, o2sp=sim)
    features = out["features"]
    assert set(features) == {"pre", "post", "o2sp"}
    for path in features.values():
        assert [f.shape for f in path] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 160, 4, 4), (2, 256, 2, 2)]
    assert out["logits"].shape == (2, 2, 64, 64)
    loss = o2sp_self_distillation_loss(features)
    expected = 1e-4 * sum((a - s).abs().mean() + (b - s).abs().mean()
                          for a, b, s in zip(features["pre"], features["post"], features["o2sp"]))
    torch.testing.assert_close(loss, expected)
    # No detach: the loss pulls on all three paths.
    grads = torch.autograd.grad(loss, [features["pre"][0], features["post"][0], features["o2sp"][0]])
    assert all(g.abs().sum() > 0 for g in grads)
    same = {k: [features["o2sp"][i] for i in range(4)] for k in ("pre", "post", "o2sp")}
    assert o2sp_self_distillation_loss(same) == 0
    model.eval()
    with pytest.raises(ValueError, match="training"):
        model(pre, post, o2sp=sim)


# --- Forward contracts ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", MIT)
def test_mit_forward(mit_models, name):
    _check_forward(mit_models[name], 256)
    _check_forward(mit_models[name], 512, train=False)


def test_eval_is_deterministic(mit_models):
    model = mit_models["m2cd_mit_b0"].eval()
    pre, post = _pair(64)
    with torch.no_grad():
        assert torch.equal(model(pre, post), model(pre, post))


@heavy
@pytest.mark.usefixtures("published_heads")
@pytest.mark.parametrize("name", CONVNEXT)
def test_convnext_forward_and_gflops(name):
    torch.manual_seed(0)
    model = create(name)
    _check_forward(model, 256)
    assert abs(count_gflops(model, size=256) / TABLE_I[name][1] - 1) < 0.10
    _check_forward(model, 512, train=False)  # the engine's default tile
    blocks = [m for m in model.modules() if isinstance(m, ConvNeXtMoEBlock)]
    assert len(blocks) == (9 if name == "m2cd_convnext_t" else 18)
    assert blocks[0].moe.num_experts == (8 if name == "m2cd_convnext_t" else 4)



def test_convnext_starts_from_the_authors_random_weights():
    """Their ConvNeXt_MoE.init_weights: linear layers (the mixtures' too) truncated normal, std 0.02;
    convolutions normal, std sqrt(2 / fan-out); biases 0 (timm's own init gives every conv std 0.02)."""
    torch.manual_seed(0)
    encoder = create("m2cd_convnext_t").encoder
    stem, depthwise = encoder.backbone.stem[0], encoder.backbone.stages[1].blocks[0].conv_dw
    moe = next(m for m in encoder.modules() if isinstance(m, ConvNeXtMoEBlock)).moe
    for conv, fan_out in ((stem, 4 * 4 * 96), (depthwise, 7 * 7)):
        assert float(conv.weight.detach().std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)
        assert not conv.bias.any()
    for linear in (moe.experts[0].fc1, moe.gate.projection, encoder.backbone.stages[0].blocks[0].mlp.fc1):
        assert float(linear.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
        assert not linear.bias.any()

def test_a_fuse_of_resized_levels_equals_the_concatenation_it_replaces():
    torch.manual_seed(0)
    fuse = ConvBNReLU(3 * 8, 16).eval()
    fuse[1].running_mean.normal_()
    fuse[1].running_var.uniform_(0.5, 2.0)
    parts = [torch.randn(2, 8, 24, 40), torch.randn(2, 8, 12, 20), torch.randn(2, 8, 5, 7)]
    with torch.no_grad():
        literal = fuse(torch.cat([F.interpolate(p, size=(48, 80), mode="bilinear", align_corners=False)
                                  for p in parts], dim=1))
        torch.testing.assert_close(fuse_resized(fuse, parts, (48, 80)), literal, rtol=0, atol=1e-5)
        # at the first part's own size (the Changer's levels), as well
        literal = fuse(torch.cat([F.interpolate(p, size=(24, 40), mode="bilinear", align_corners=False)
                                  for p in parts], dim=1))
        torch.testing.assert_close(fuse_resized(fuse, parts, (24, 40)), literal, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="1x1 conv without bias"):  # a 3x3 conv does not commute so
            fuse_resized(ConvBNReLU(3 * 8, 16, kernel_size=3).eval(), parts, (48, 80))


@pytest.mark.parametrize("head", ["upernet", "fcn"])
def test_other_heads(mit_models, head):
    torch.manual_seed(0)
    model = create("m2cd_mit_b0", head=head)
    _check_forward(model, 128, batch=2)  # pyramid pooling to 1x1 needs 2 samples for BatchNorm
    assert count_params(model) != count_params(mit_models["m2cd_mit_b0"])


def test_unknown_head_is_refused():
    with pytest.raises(ValueError, match="unknown head"):
        create("m2cd_mit_b0", head="deeplab")


def test_in_chans():
    model = create("m2cd_mit_b0", in_chans=4).eval()
    with torch.no_grad():
        assert model(*_pair(64, channels=4)).shape == (1, 2, 64, 64)


# --- Backbone weights -----------------------------------------------------------------------------

def _timm_mit_b0(seed: int, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model("pvt_v2_b0", pretrained=False, mlp_ratios=4, **kwargs)


def _to_segformer(timm_state: dict) -> dict:
    """timm PVT-v2 names -> SegFormer's MiT release names, written out independently of the loader."""
    out = {}
    for k, v in timm_state.items():
        k = k.replace("patch_embed.", "patch_embed1.")
        for i in range(1, 4):
            k = k.replace(f"stages.{i}.downsample.", f"patch_embed{i + 1}.")
        for i in range(4):
            k = k.replace(f"stages.{i}.blocks.", f"block{i + 1}.")
            k = k.replace(f"stages.{i}.norm.", f"norm{i + 1}.")
        out[k.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")] = v
    return out


def _to_mmseg(segformer_state: dict) -> dict:
    """SegFormer names -> mmseg names, as mmseg's mit2mmseg converter does it."""
    out = {}
    for original, v in segformer_state.items():
        k = original
        if k.startswith("head") or ".attn.kv." in k:
            continue
        if k.startswith("patch_embed"):
            i = int(k[len("patch_embed")])
            k = k.replace(f"patch_embed{i}", f"layers.{i - 1}.0").replace("proj.", "projection.")
        elif k.startswith("block"):
            i = int(k[len("block")])
            k = k.replace(f"block{i}", f"layers.{i - 1}.1")
            if ".attn.q." in k:
                v = torch.cat([v, segformer_state[original.replace(".attn.q.", ".attn.kv.")]])
                k = k.replace("attn.q.", "attn.attn.in_proj_")
            elif ".attn.proj." in k:
                k = k.replace("attn.proj.", "attn.attn.out_proj.")
            elif ".mlp." in k:
                if "fc1.weight" in k or "fc2.weight" in k:
                    v = v.reshape(*v.shape, 1, 1)
                k = (k.replace("mlp.fc1.", "ffn.layers.0.").replace("mlp.dwconv.dwconv.", "ffn.layers.1.")
                     .replace("mlp.fc2.", "ffn.layers.4."))
        elif k.startswith("norm"):
            i = int(k[len("norm")])
            k = k.replace(f"norm{i}", f"layers.{i - 1}.2")
        out[k] = v
    return out


def _assert_backbone_equals(model, source_state: dict):
    own = model.encoder.backbone.state_dict()
    for key, value in own.items():
        assert torch.equal(value, source_state[key]), key


@pytest.mark.parametrize("fmt", ["timm", "segformer", "mmseg"])
def test_load_mit_backbone_weights(tmp_path, fmt):
    source = _timm_mit_b0(seed=1).state_dict()  # with its ImageNet classifier (head.*)
    state = {"timm": source, "segformer": _to_segformer(source),
             "mmseg": _to_mmseg(_to_segformer(source))}[fmt]
    path = tmp_path / f"{fmt}.pth"
    torch.save({"state_dict": state} if fmt == "mmseg" else state, path)
    model = create("m2cd_mit_b0")
    moe_before = {k: v.clone() for k, v in model.encoder.moe.state_dict().items()}
    report = model.load_backbone_weights(path)
    assert report["format"] == fmt
    _assert_backbone_equals(model, source)
    for key, value in model.encoder.moe.state_dict().items():
        assert torch.equal(value, moe_before[key]), key
    if fmt != "mmseg":
        assert report["dropped"] == ["head.bias", "head.weight"]


def test_bad_keys_and_shapes_are_refused_by_name(tmp_path):
    model = create("m2cd_mit_b0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mmseg = _to_mmseg(_to_segformer(_timm_mit_b0(seed=1).state_dict()))

    bogus = dict(mmseg, **{"layers.0.1.0.attn.bogus.weight": torch.zeros(3)})
    torch.save(bogus, tmp_path / "bogus.pth")
    with pytest.raises(ValueError, match=r"unknown keys \(1\): layers\.0\.1\.0\.attn\.bogus\.weight"):
        model.load_backbone_weights(tmp_path / "bogus.pth")

    incomplete = {k: v for k, v in mmseg.items() if k != "layers.2.2.weight"}
    torch.save(incomplete, tmp_path / "incomplete.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): stages\.2\.norm\.weight"):
        model.load_backbone_weights(tmp_path / "incomplete.pth")

    # timm's own pvt_v2_b0 has MLP ratio 8 in its first two stages: not MiT-b0.
    torch.manual_seed(0)
    torch.save(timm.create_model("pvt_v2_b0", pretrained=False).state_dict(), tmp_path / "pvt.pth")
    with pytest.raises(ValueError, match=r"shape mismatches .*stages\.0\.blocks\.0\.mlp\.fc1\.weight"):
        model.load_backbone_weights(tmp_path / "pvt.pth")

    for key, value in model.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key


def test_load_adapts_the_stem_to_other_band_counts(tmp_path):
    source = _timm_mit_b0(seed=1).state_dict()
    torch.save(source, tmp_path / "rgb.pth")
    model = create("m2cd_mit_b0", in_chans=4)
    report = model.load_backbone_weights(tmp_path / "rgb.pth")
    assert report["adapted"] == ["patch_embed.proj.weight"]
    assert model.encoder.backbone.patch_embed.proj.weight.shape[1] == 4


@heavy
def test_load_convnext_backbone_weights(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("convnext_tiny", pretrained=False).state_dict()
    torch.save(source, tmp_path / "convnext_tiny.pth")
    del source
    model = create("m2cd_convnext_t")
    moe_before = {k: v.clone() for k, v in model.encoder.backbone.state_dict().items() if ".moe." in k}
    report = model.load_backbone_weights(tmp_path / "convnext_tiny.pth")
    source = torch.load(tmp_path / "convnext_tiny.pth", weights_only=True)
    own = model.encoder.backbone.state_dict()
    for key in report["loaded"]:
        assert torch.equal(own[key], source[key]), key
    # The dense MLPs of the 9 MoE blocks are the file's only unused weights besides the classifier.
    mlp = [k for k in report["dropped"] if ".mlp." in k]
    assert len(mlp) == 9 * 4 and all(k.startswith("stages.") for k in mlp)
    assert {k for k in report["dropped"] if ".mlp." not in k} == {k for k in source if k.startswith("head.")}
    assert set(report["kept_initial"]) == set(moe_before)
    for key, value in moe_before.items():
        assert torch.equal(own[key], value), key
