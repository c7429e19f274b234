"""Training losses: pixel losses with ignored pixels and OHEM, the extra terms of M2CD (gate balancing,
O2SP self-distillation on simulated SAR) and SSCFNet (auxiliary heads), and MTKD's distillation term.

Pixel losses follow mmseg's default reduction (``avg_non_ignore=False``): the loss of the kept pixels
summed, divided by all pixels of the batch, ignored and OHEM-dropped ones included. With no ignored pixel
this is the plain mean, so for SSCFNet the ``seg`` and ``aux`` terms sum to the paper's multi-loss
(eq. 11: BCE on the main logits plus ``aux_weight`` times BCE on each auxiliary map); the trainer's
form also leaves out the label padding of rotations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from geochange.trainer.data import IGNORE


@torch.no_grad()
def ohem_keep(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, thresh: float,
              min_kept: int) -> torch.Tensor:
    """mmseg's OHEM pixel sampler: keep labelled pixels whose true-class probability is below
    ``max(thresh, p_k)``, ``p_k`` the probability ranked ``min_kept`` x batch size from the lowest."""
    prob = torch.softmax(logits.float(), dim=1).gather(1, target[:, None])[:, 0]
    ranked = prob[valid].sort().values
    threshold = thresh
    if ranked.numel():
        threshold = max(thresh, float(ranked[min(min_kept * target.shape[0], ranked.numel() - 1)]))
    return valid & (prob < threshold)


def pixel_loss(logits: torch.Tensor, target: torch.Tensor, ohem: dict | None = None) -> torch.Tensor:
    """BCE (one logit channel) or cross-entropy (two, with optional OHEM) of ``(N, C, H, W)`` logits
    against an ``(N, H, W)`` 0/1/IGNORE target."""
    valid = target != IGNORE
    logits = logits.float()
    if logits.shape[1] == 1:
        per_pixel = F.binary_cross_entropy_with_logits(
            logits[:, 0], torch.where(valid, target, 0).float(), reduction="none")
        keep = valid
    else:
        classes = torch.where(valid, target, 0).long()
        per_pixel = F.cross_entropy(logits, classes, reduction="none")
        keep = valid if ohem is None else ohem_keep(logits, classes, valid, **ohem)
    return (per_pixel * keep).sum() / target.numel()


def simulate_sar_speckle(x: torch.Tensor, generator: torch.Generator | None = None,
                         variance: int | None = None) -> torch.Tensor:
    """The input of M2CD's O2SP path: simulated SAR from an (already normalised) optical image, ``x``
    times fully developed speckle, Gamma noise of mean 1 and variance ``v`` (shape 1/v, scale v), i.i.d.
    per sample, channel and pixel.

    ``v`` is drawn uniformly from the integers 1..20 once per call unless ``variance`` is given.
    ``generator`` (on ``x``'s device) makes the draw reproducible.
    """
    if variance is None:
        device = generator.device if generator is not None else "cpu"
        variance = int(torch.randint(1, 21, (), generator=generator, device=device))
    if variance <= 0:
        raise ValueError(f"speckle variance must be positive, got {variance}")
    concentration = torch.full(x.shape, 1.0 / variance, device=x.device, dtype=torch.float32)
    # torch.distributions.Gamma samples with this op but takes no generator.
    speckle = torch._standard_gamma(concentration, generator=generator) * variance
    return x * speckle.to(x.dtype)


def o2sp_self_distillation_loss(features: dict, weight: float = 1e-4) -> torch.Tensor:
    """``weight * sum over levels of (L1(pre, o2sp) + L1(post, o2sp))`` (mean absolute difference, no
    detach: both sides learn), from the ``features`` a training forward with ``o2sp=`` returns."""
    return weight * sum(F.l1_loss(a, s) + F.l1_loss(b, s)
                        for a, b, s in zip(features["pre"], features["post"], features["o2sp"]))


def training_losses(output, target: torch.Tensor, cfg: dict) -> dict[str, torch.Tensor]:
    """The weighted loss terms of a training-mode output (their sum is the total loss):

    ``seg`` (main logits), ``aux`` (``aux_weight`` x each auxiliary head, SSCFNet), ``gate`` (MoE
    balancing, M2CD), ``o2sp`` (O2SP self-distillation with weight ``o2sp``, when the O2SP path ran).
    """
    output = output if isinstance(output, dict) else {"logits": output}
    terms = {"seg": pixel_loss(output["logits"], target, cfg["ohem"])}
    if output.get("aux"):
        terms["aux"] = cfg["aux_weight"] * sum(pixel_loss(a, target, cfg["ohem"]) for a in output["aux"])
    if "gate_loss" in output:
        terms["gate"] = cfg["gate_weight"] * output["gate_loss"].float()
    if "features" in output:
        terms["o2sp"] = o2sp_self_distillation_loss(output["features"], cfg["o2sp"]).float()
    return terms


def distillation_logits(output) -> torch.Tensor:
    """The logits MTKD compares: the head's own resolution when the model exposes it (before upsampling,
    as the authors compare them), else the output logits."""
    if isinstance(output, dict):
        return output.get("logits_lowres", output["logits"])
    return output


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
    """A frozen teacher's distillation logits. Every layer runs in eval mode (no dropout, running BN
    statistics, no gate noise); only the top module is flagged as training so that it returns its
    training-mode outputs, which include the head's own-resolution logits."""
    teacher.eval()
    teacher.training = True
    try:
        return distillation_logits(teacher(pre, post))
    finally:
        teacher.training = False


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, weight: float) -> torch.Tensor:
    """MTKD: ``weight`` x MSE between the student's and its teacher's raw logits."""
    return weight * F.mse_loss(student.float(), teacher.float())
