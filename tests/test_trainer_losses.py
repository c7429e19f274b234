"""Trainer losses: mmseg's OHEM and reduction, ignored pixels, SSCFNet's multi-loss, and the logits MTKD
compares."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geochange.engine.models import create
from geochange.trainer.data import IGNORE
from geochange.trainer.losses import (distillation_logits, distillation_loss, ohem_keep, pixel_loss, teacher_logits,
                                      training_losses)

LOSS = {"ohem": None, "aux_weight": 0.5, "gate_weight": 1.0, "o2sp": 0.0}


def _reference_ohem(logits, target, thresh, min_kept):
    """mmseg's OHEMPixelSampler, spelled out in numpy."""
    prob = torch.softmax(logits, 1).numpy()
    t = target.numpy()
    valid = t != IGNORE
    classes = np.where(valid, t, 0)
    p_true = np.take_along_axis(prob, classes[:, None], 1)[:, 0]
    ranked = np.sort(p_true[valid])
    threshold = max(thresh, ranked[min(min_kept * t.shape[0], ranked.size - 1)])
    return valid & (p_true < threshold)


@pytest.mark.parametrize("min_kept", [10, 100000])
def test_ohem_matches_mmseg(min_kept):
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 16) * 3
    target = (torch.rand(2, 16, 16) < 0.3).long()
    target[0, :2] = IGNORE
    valid = target != IGNORE
    classes = torch.where(valid, target, 0)
    kept = ohem_keep(logits, classes, valid, 0.7, min_kept)
    np.testing.assert_array_equal(kept.numpy(), _reference_ohem(logits, target, 0.7, min_kept))
    if min_kept == 10:
        assert 0 < kept.sum() < valid.sum()  # hard pixels only


def test_pixel_loss_reduction_and_ignore():
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 8, 8)
    target = (torch.rand(2, 8, 8) < 0.5).long()
    plain = pixel_loss(logits, target)
    assert torch.allclose(plain, F.cross_entropy(logits, target))
    ignored = target.clone()
    ignored[:, :4] = IGNORE
    # mmseg's default: the kept pixels' loss over all pixels of the batch.
    expected = F.cross_entropy(logits, torch.where(ignored == IGNORE, 0, ignored), reduction="none")[:, 4:].sum() / 128
    assert torch.allclose(pixel_loss(logits, ignored), expected)
    one = torch.randn(2, 1, 8, 8)
    assert torch.allclose(pixel_loss(one, target), F.binary_cross_entropy_with_logits(one[:, 0], target.float()))


def test_sscfnet_terms_are_the_paper_s_multi_loss():
    """Eq. 11: BCE on the main logits plus ``aux_weight`` x BCE on each auxiliary map."""
    torch.manual_seed(2)
    output = {"logits": torch.randn(2, 1, 16, 16), "aux": [torch.randn(2, 1, 16, 16) for _ in range(4)]}
    target = (torch.rand(2, 16, 16) < 0.4).long()
    t = target.float().unsqueeze(1)
    terms = training_losses(output, target, LOSS)
    assert set(terms) == {"seg", "aux"}
    torch.testing.assert_close(terms["seg"], F.binary_cross_entropy_with_logits(output["logits"], t))
    torch.testing.assert_close(terms["aux"], 0.5 * sum(F.binary_cross_entropy_with_logits(a, t)
                                                       for a in output["aux"]))
    assert set(training_losses(output["logits"], target, LOSS)) == {"seg"}  # an eval-mode output


def test_distillation_compares_the_head_resolution_logits():
    torch.manual_seed(3)
    teacher = create("changer_mit_b0").eval()
    pre, post = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    lowres = teacher_logits(teacher, pre, post)
    assert lowres.shape == (1, 2, 16, 16) and not lowres.requires_grad and not teacher.training
    with torch.no_grad():
        full = teacher(pre, post)
    # Eval-mode layers throughout: upsampling the teacher's low-resolution logits gives its eval output.
    torch.testing.assert_close(F.interpolate(lowres, size=(64, 64), mode="bilinear", align_corners=False), full)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert torch.equal(teacher_logits(teacher, pre, post), lowres)
    student = {"logits": torch.zeros(1, 2, 64, 64), "logits_lowres": torch.zeros(1, 2, 16, 16)}
    assert distillation_logits(student) is student["logits_lowres"]
    tiny = torch.zeros(1, 1, 8, 8)
    assert distillation_logits(tiny) is tiny
    assert torch.allclose(distillation_loss(torch.ones(1, 2, 4, 4), torch.zeros(1, 2, 4, 4), 5e-3),
                          torch.tensor(5e-3))
