"""SSCFNet: the cross recombination, published sizes, forward contracts and that the multiloss (the
trainer's, see test_trainer_losses.py) trains every head."""
from __future__ import annotations

import pytest
import torch

from geochange.engine.models import create, spec
from geochange.engine.models.sscfnet import cross_recombine
from geochange.engine.models.stats import count_gflops, count_params
from geochange.trainer.losses import training_losses

VARIANTS = ("sscfnet_r50", "sscfnet_rx50", "sscfnet_r101")
# Table VI of the paper (256 x 256 input): params (M), GFLOPs (multiply-adds).
TABLE_VI = {"sscfnet_r50": (29.21, 73.06), "sscfnet_rx50": (28.68, 72.12),
            "sscfnet_r101": (48.20, 111.95)}
AUX = ("aux_heads",)


def _tagged_levels(widths=(8, 16, 32, 64), size=3) -> list[torch.Tensor]:
    """Levels whose every channel is filled with its own constant ``1000 * level + channel``."""
    return [(1000 * level + torch.arange(width, dtype=torch.float32)).view(1, width, 1, 1)
            .expand(2, width, size, size).contiguous() for level, width in enumerate(widths)]


def _chunk_tags(branch: torch.Tensor) -> list[tuple[int, int]]:
    """(level, channel) tag of every channel of a recombined branch."""
    values = branch[0, :, 0, 0].long().tolist()
    assert torch.equal(branch, branch[:, :, :1, :1].expand_as(branch)), "channels were mixed"
    return [(v // 1000, v % 1000) for v in values]


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: create(name) for name in VARIANTS}


def test_cross_recombine_uses_each_chunk_once_in_authors_order():
    widths = (8, 16, 32, 64)
    levels = _tagged_levels(widths)
    branches = cross_recombine(levels)
    assert len(branches) == 4
    chunk = [w // 4 for w in widths]
    seen = []
    for r, branch in enumerate(branches):
        assert branch.shape == (2, sum(chunk), 3, 3)
        tags = _chunk_tags(branch)
        seen += tags
        offset = 0
        for j in range(4):
            level = (j - r) % 4  # branch r, chunk j comes from level (j - r) mod 4
            expected = [(level, j * chunk[level] + c) for c in range(chunk[level])]
            assert tags[offset:offset + chunk[level]] == expected, (r, j)
            offset += chunk[level]
    every = [(level, c) for level, w in enumerate(widths) for c in range(w)]
    assert sorted(seen) == every  # every channel of every level exactly once

    # Spelled out: branch 0 = c1[0] c2[1] c3[2] c4[3], branch 1 = c4[0] c1[1] c2[2] c3[3].
    def levels_of(branch_tags):
        out, last = [], None
        for level, _ in branch_tags:
            if level != last:
                out.append(level)
                last = level
        return out

    assert [levels_of(_chunk_tags(b)) for b in branches] == [[0, 1, 2, 3], [3, 0, 1, 2],
                                                             [2, 3, 0, 1], [1, 2, 3, 0]]


def test_cross_recombine_is_the_papers_eq3_in_reverse_branch_order():
    # Paper eq. (3): F_i = Concat[X_{(i+1)%S,1}, X_{(i+2)%S,2}, ..., X_{i,S}] (level, 1-based chunk).
    levels = _tagged_levels()
    chunks = [torch.split(x, x.shape[1] // 4, dim=1) for x in levels]
    paper = [torch.cat([chunks[(i + j) % 4][j - 1] for j in range(1, 5)], dim=1) for i in range(4)]
    branches = cross_recombine(levels)
    for i in range(4):
        assert torch.equal(paper[i], branches[3 - i])


def test_cross_recombine_refuses_uneven_chunks():
    with pytest.raises(ValueError):
        cross_recombine([torch.zeros(1, 6, 2, 2)] * 4)


@pytest.mark.parametrize("name", VARIANTS)
def test_params_and_gflops_match_table_vi(name):
    with torch.device("meta"):  # sizes only: no memory, no arithmetic
        model = create(name)
    params_m, gflops = TABLE_VI[name]
    inference = count_params(model, exclude_prefixes=AUX) / 1e6
    assert abs(inference / params_m - 1) < 0.02, inference
    # The published figure matches the model *with* its four auxiliary heads to its last digit (half
    # a hundredth of a million is 0.017 %): Table VI counted them, and this checks every layer's size.
    assert abs(count_params(model) / 1e6 / params_m - 1) < 2e-4, count_params(model)
    measured = count_gflops(model, size=256)
    assert abs(measured / gflops - 1) < 0.10, measured
    assert spec(name).paper["params_m"] == params_m
    assert spec(name).paper["gflops"] == gflops


def test_registration():
    for name in VARIANTS:
        s = spec(name)
        assert s.activation == "sigmoid"
        assert s.paper["gflops_input"] == 256 and s.paper["source"] == "SSCFNet Table VI"
        assert [i["bands"] for i in s.inputs] == [3, 3]
        assert all(i["modality"] == "optical" for i in s.inputs)
    assert spec("sscfnet_r50").paper["accuracy"] == "LEVIR-CD mF1 94.89 (mean of change and no-change F1, Sec. IV-C)"


def test_encoder_is_dilated_output_stride_8_without_classifier(models):
    encoder = models["sscfnet_r50"].encoder
    assert encoder.feature_info.reduction() == [4, 8, 8, 8]
    assert encoder.feature_info.channels() == [256, 512, 1024, 2048]
    assert not any(n.startswith("fc.") for n, _ in encoder.named_parameters())


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_eval_and_train(models, name):
    model = models[name]
    pre, post = torch.rand(1, 3, 256, 256), torch.rand(1, 3, 256, 256)
    model.eval()
    with torch.no_grad():
        logits = model(pre, post)
        assert isinstance(logits, torch.Tensor)
        assert logits.shape == (1, 1, 256, 256)
        assert torch.isfinite(logits).all()
        model.train()
        try:
            out = model(pre, post)
        finally:
            model.eval()
    assert set(out) == {"logits", "aux"}
    assert out["logits"].shape == (1, 1, 256, 256)
    assert len(out["aux"]) == 4
    assert all(a.shape == (1, 1, 256, 256) and torch.isfinite(a).all() for a in out["aux"])


def test_forward_eval_512(models):
    model = models["sscfnet_r50"].eval()
    with torch.no_grad():
        logits = model(torch.rand(1, 3, 512, 512), torch.rand(1, 3, 512, 512))
    assert logits.shape == (1, 1, 512, 512)


def test_eval_is_deterministic_and_symmetric_in_the_dates(models):
    # |f(pre) - f(post)| does not care which date comes first.
    model = models["sscfnet_r50"].eval()
    pre, post = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        logits = model(pre, post)
        assert torch.equal(logits, model(pre, post))
        assert torch.allclose(logits, model(post, pre), atol=1e-6)
        assert not torch.allclose(logits, model(pre, pre), atol=1e-6)


def test_in_chans():
    torch.manual_seed(0)
    model = create("sscfnet_r50", in_chans=4).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 4, 64, 96), torch.rand(1, 4, 64, 96)).shape == (1, 1, 64, 96)


def test_multi_loss_trains_every_head(models):
    model = models["sscfnet_r50"].train()
    try:
        model.zero_grad()
        out = model(torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64))
        terms = training_losses(out, (torch.rand(2, 64, 64) > 0.5).long(), {"ohem": None, "aux_weight": 0.5})
        loss = terms["seg"] + terms["aux"]
        loss.backward()
    finally:
        model.eval()
    assert torch.isfinite(loss)
    for head in (model.head, *model.aux_heads):
        assert head[0].weight.grad is not None and head[0].weight.grad.abs().sum() > 0
    assert model.encoder.conv1.weight.grad.abs().sum() > 0


def test_backbone_weights_from_a_timm_checkpoint(tmp_path):
    import timm

    from geochange.engine.models import create

    torch.manual_seed(1)
    resnet = timm.create_model("resnet50", pretrained=False)
    torch.save(resnet.state_dict(), tmp_path / "resnet50.pth")
    model = create("sscfnet_r50")
    report = model.load_backbone_weights(tmp_path / "resnet50.pth")
    assert report["loaded"]
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, resnet.state_dict()[key])
    torch.save({**resnet.state_dict(), "extra.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(Exception, match="extra.weight"):
        create("sscfnet_r50").load_backbone_weights(tmp_path / "bad.pth")
