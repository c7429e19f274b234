"""SSCFNet: spatial-spectral cross fusion network (Wang et al., IEEE JSTARS 2023).

A siamese dilated ResNet (output stride 8) gives four levels per date; their absolute differences
are resized to the first level's size, each cut into four channel chunks and recombined so that
every branch holds one chunk of every level (the "combined enhancement"). Four grouped convolutions
of growing kernel size, each with squeeze-and-excitation, process the branches; their sum, after a
second SE, goes to a light head that predicts one change logit per pixel. In training mode four
auxiliary heads, one per branch, add deep supervision (the paper's "multiloss", the trainer's
``aux`` loss term).

Where the paper and the authors' code (Wprofessor/SSCFNet) disagree, this follows the code:
bilinear resizing (the paper says nearest) and the branch order of the recombination (see
``cross_recombine``).
"""
from __future__ import annotations

from typing import Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register
from ..inputs import optical_input
from .backbone_weights import load_backbone_weights

BACKBONES = {"r50": "resnet50", "rx50": "resnext50_32x4d", "r101": "resnet101"}
BRANCH_KERNELS = (3, 5, 7, 9)
BRANCH_GROUPS = (2, 4, 8, 16)


def cross_recombine(levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Cut each of the ``S`` same-size levels into ``S`` channel chunks and build ``S`` branches:
    branch ``r`` is the concatenation, for ``j = 0 .. S-1``, of chunk ``j`` of level ``(j - r) mod S``.

    Every chunk is used exactly once and every branch holds one chunk of every level. This is the
    order of the authors' code (branch 0 = c1[0] c2[1] c3[2] c4[3], branch 1 = c4[0] c1[1] c2[2]
    c3[3], ...). The paper's eq. (2)-(3) lists the same four branches in reverse order
    (its F_i is branch ``S - 1 - i`` here); the order matters because branch ``r`` meets the
    ``r``-th kernel size, and the authors' code is what produced the published results.
    """
    count = len(levels)
    chunks = []
    for level in levels:
        if level.shape[1] % count:
            raise ValueError(f"{level.shape[1]} channels cannot be cut into {count} equal chunks")
        chunks.append(torch.split(level, level.shape[1] // count, dim=1))
    return [torch.cat([chunks[(j - r) % count][j] for j in range(count)], dim=1)
            for r in range(count)]


class SqueezeExcitation(nn.Module):
    """Channel attention: global average pool, FC + ReLU, FC + sigmoid, rescale (paper eq. 7-9).
    The FCs are bias-free like the widely used ``SEAttention`` block the authors' code imports
    (its file is not published; the paper does not say, and biases would add only ~0.001 M)."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.fc(x.mean(dim=(2, 3)))
        return x * weights[:, :, None, None]


class ScaleBranch(nn.Sequential):
    """One branch of the semantic cross-fusion: grouped k x k conv (same size), BN, ReLU, SE."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, groups: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            SqueezeExcitation(out_channels, reduction=8),
        )


class SSCFModule(nn.Module):
    """Size unifier, cross recombination, the four scale branches and their SE-weighted sum.

    Returns the four branch outputs (for the auxiliary heads) and the fused map.
    """

    def __init__(self, level_channels: Sequence[int]):
        super().__init__()
        branch_in = sum(level_channels) // len(level_channels)  # one chunk of every level
        self.out_channels = branch_in // 4
        self.branches = nn.ModuleList(
            ScaleBranch(branch_in, self.out_channels, kernel, groups)
            for kernel, groups in zip(BRANCH_KERNELS, BRANCH_GROUPS))
        self.fused_attention = SqueezeExcitation(self.out_channels, reduction=16)

    def forward(self, levels: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        size = levels[0].shape[-2:]
        unified = [levels[0]] + [F.interpolate(level, size=size, mode="bilinear", align_corners=False)
                                 for level in levels[1:]]
        branch_outputs = [branch(x) for branch, x in zip(self.branches, cross_recombine(unified))]
        fused = self.fused_attention(torch.stack(branch_outputs).sum(dim=0))
        return branch_outputs, fused


class PredictionHead(nn.Sequential):
    """Depthwise-separable 3x3 conv (the authors' "lightweight" option), BN, ReLU, dropout, 1x1 logit."""

    def __init__(self, channels: int):
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
            nn.Conv2d(channels, 1, 1),
        )


class AuxiliaryHead(nn.Sequential):
    """Deep-supervision head on one branch: 3x3 conv to a quarter of the channels, BN, channel
    dropout, 1x1 logit. No ReLU after the BN: the authors' head has none."""

    def __init__(self, channels: int):
        super().__init__(
            nn.Conv2d(channels, channels // 4, 3, padding=1),
            nn.BatchNorm2d(channels // 4),
            nn.Dropout2d(0.1),
            nn.Conv2d(channels // 4, 1, 1),
        )


class SSCFNet(nn.Module):
    """``model(pre, post)`` -> change logits ``(N, 1, H, W)``; in training mode a dict
    ``{"logits": ..., "aux": [4 auxiliary logits (N, 1, H, W)]}``.

    The auxiliary heads are always built, as in the authors' code, so that a model in training and
    the package saved from it have the same weights; they only run in training mode. The inference
    model's size leaves them out (``count_params(model, exclude_prefixes=("aux_heads",))``); the paper's
    Table VI figures (params and FLOPs) match the model with them.
    """

    def __init__(self, backbone: str = "resnet50", in_chans: int = 3):
        super().__init__()
        # Output stride 8: stride replaced by dilation in the last two stages, as in the
        # authors' backbone; features c1..c4 only (no classifier is built, so none is counted).
        self.encoder = timm.create_model(backbone, pretrained=False, features_only=True,
                                         out_indices=(1, 2, 3, 4), output_stride=8, in_chans=in_chans)
        self.sscf = SSCFModule(self.encoder.feature_info.channels())
        channels = self.sscf.out_channels
        self.head = PredictionHead(channels)
        self.aux_heads = nn.ModuleList(AuxiliaryHead(channels) for _ in range(4))

    def forward(self, pre: torch.Tensor, post: torch.Tensor):
        size = pre.shape[-2:]
        # Two passes through the shared encoder (not one batch of both dates), so that in
        # training the batch-norm statistics are those of one date at a time, as in the authors' code.
        differences = [torch.abs(a - b) for a, b in zip(self.encoder(pre), self.encoder(post))]
        branch_outputs, fused = self.sscf(differences)
        logits = F.interpolate(self.head(fused), size=size, mode="bilinear", align_corners=False)
        if not self.training:
            return logits
        aux = [F.interpolate(head(x), size=size, mode="bilinear", align_corners=False)
               for head, x in zip(self.aux_heads, branch_outputs)]
        return {"logits": logits, "aux": aux}

    def load_backbone_weights(self, path) -> dict:
        """ImageNet weights for the encoder from a local timm ResNet/ResNeXt checkpoint; its classifier
        ``fc`` has no place here and is dropped. The fusion and heads keep their initialisation."""
        return load_backbone_weights(self.encoder, path, unused_prefixes=["fc."])


def _paper(params_m: float, gflops: float, f1: str) -> dict:
    return {"params_m": params_m, "gflops": gflops, "gflops_input": 256, "source": "SSCFNet Table VI",
            "accuracy": f"LEVIR-CD mF1 {f1} (mean of change and no-change F1, Sec. IV-C)"}


_INPUTS = (optical_input(3), optical_input(3))


@register("sscfnet_r50", activation="sigmoid", inputs=_INPUTS, training_only=("aux_heads",),
          paper=_paper(29.21, 73.06, "94.89"),
          description="SSCFNet, siamese dilated ResNet-50 with spatial-spectral cross fusion")
def sscfnet_r50(in_chans: int = 3) -> SSCFNet:
    return SSCFNet(BACKBONES["r50"], in_chans=in_chans)


@register("sscfnet_rx50", activation="sigmoid", inputs=_INPUTS, training_only=("aux_heads",),
          paper=_paper(28.68, 72.12, "95.11"),
          description="SSCFNet, siamese dilated ResNeXt-50 (32x4d) with spatial-spectral cross fusion")
def sscfnet_rx50(in_chans: int = 3) -> SSCFNet:
    return SSCFNet(BACKBONES["rx50"], in_chans=in_chans)


@register("sscfnet_r101", activation="sigmoid", inputs=_INPUTS, training_only=("aux_heads",),
          paper=_paper(48.20, 111.95, "95.31"),
          description="SSCFNet, siamese dilated ResNet-101 with spatial-spectral cross fusion")
def sscfnet_r101(in_chans: int = 3) -> SSCFNet:
    return SSCFNet(BACKBONES["r101"], in_chans=in_chans)
