"""Decode heads (mmseg's SegFormer, UPerNet and FCN heads) and the layers heads share: a head takes an
encoder's levels, finest first, and returns class logits at a fraction of the input size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConvBNReLU(nn.Sequential):
    """k x k conv (same size, no bias: the BN has one), BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                                   bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def classifier_conv(channels: int, num_classes: int) -> nn.Conv2d:
    """The 1x1 conv giving a head's logits."""
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)  # mmseg's init of the last conv
    nn.init.zeros_(conv.bias)
    return conv


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear, pixel-area aligned (``align_corners=False``): mmseg's resize of features and logits."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def fuse_resized(fuse: ConvBNReLU, parts: list[torch.Tensor], size) -> torch.Tensor:
    """``fuse(torch.cat([resize(p, size) for p in parts], dim=1))``, the 1x1 conv run on each part at its own
    size before the resize: each part's slice of the conv's weight, resized, then summed.

    The same function (to rounding): a 1x1 conv mixes channels, a bilinear resize mixes pixels with the
    same weights in every channel, so they commute. It saves the conv's work on the upsampled pixels and
    the concatenation: M2CD-MiT-b0's SegFormer head fuses 1,024 channels at half the input size, 17 G
    multiply-adds a 512 px window against 1.4 G in this form.
    """
    conv, norm, act = fuse
    if conv.kernel_size != (1, 1) or conv.bias is not None:  # only a bias-free 1x1 conv commutes so simply
        raise ValueError(f"fuse_resized needs a 1x1 conv without bias, not {conv}")
    weights = conv.weight.split([p.shape[1] for p in parts], dim=1)
    return act(norm(sum(resize(F.conv2d(p, w), size) for p, w in zip(parts, weights))))


class SegFormerHead(nn.Module):
    """Project each level to ``channels`` (1x1 conv + BN + ReLU), resize, concatenate, fuse, classify.

    The levels are fused at twice the finest level's size, i.e. half the input size. The authors' head
    resizes to a fixed 128 x 128, which is that for their 256 x 256 crops and which their published FLOPs
    include; a fixed size would make the model behave differently on other tile sizes.
    """

    def __init__(self, in_channels: tuple[int, ...], channels: int = 256, num_classes: int = 2):
        super().__init__()
        self.projections = nn.ModuleList(ConvBNReLU(c, channels) for c in in_channels)
        self.fuse = ConvBNReLU(channels * len(in_channels), channels)
        self.classifier = classifier_conv(channels, num_classes)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        size = [2 * s for s in levels[0].shape[-2:]]
        x = fuse_resized(self.fuse, [proj(x) for proj, x in zip(self.projections, levels)], size)
        return self.classifier(x)


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: the input pooled to each scale, projected, resized back, concatenated
    with the input."""

    def __init__(self, in_channels: int, channels: int, scales: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels)) for s in scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [resize(branch(x), x.shape[-2:]) for branch in self.branches], dim=1)


class UPerNetHead(nn.Module):
    """mmseg's UPerHead: pyramid pooling on the coarsest level, a top-down FPN, all levels resized to the
    finest and fused by a 3x3 conv, dropout, classifier."""

    def __init__(self, in_channels: tuple[int, ...], channels: int = 128,
                 pool_scales: tuple[int, ...] = (1, 2, 3, 6), num_classes: int = 2, dropout: float = 0.1):
        super().__init__()
        self.pooling = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.bottleneck = ConvBNReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(ConvBNReLU(c, channels) for c in in_channels[:-1])
        self.smooth = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fuse = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = classifier_conv(channels, num_classes)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        laterals = [lateral(x) for lateral, x in zip(self.laterals, levels)]
        laterals.append(self.bottleneck(self.pooling(levels[-1])))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarser levels added to finer ones
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [smooth(x) for smooth, x in zip(self.smooth, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        x = self.fuse(torch.cat([outs[0]] + [resize(x, size) for x in outs[1:]], dim=1))
        return self.classifier(self.dropout(x))


class FCNHead(nn.Module):
    """mmseg's FCNHead on the coarsest level: two 3x3 conv + BN + ReLU, dropout, classifier."""

    def __init__(self, in_channels: tuple[int, ...], channels: int = 512, num_classes: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(ConvBNReLU(in_channels[-1], channels, 3),
                                   ConvBNReLU(channels, channels, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = classifier_conv(channels, num_classes)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(levels[-1])))


# By the name a model's ``head`` argument gives.
HEADS = {"segformer": SegFormerHead, "upernet": UPerNetHead, "fcn": FCNHead}
