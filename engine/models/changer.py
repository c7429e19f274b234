"""Changer (Fang, Li and Li, TGRS 2023) in the "ChangerEx" MiT form trained in the MTKD / JL1-CD paper.

Structure as in Open-CD's ``changer_ex_mit-b0/b1`` configs (also used unchanged by circleLZY/MTKD-CD):

* one MiT encoder shared by both dates (timm ``pvt_v2_b0`` / ``pvt_v2_b1`` with MiT's MLP ratio 4, which
  makes it MiT-b0 / b1 parameter for parameter);
* after each stage an interaction layer swaps half of the features between the dates before the next
  stage sees them: nothing after stage 1, every other column after stage 2, every other channel after
  stages 3 and 4;
* a head that projects the four levels of each date to 128 channels (shared 1x1 conv + BN + ReLU),
  resizes them to 1/4, fuses them to 64 channels, aligns the dates with learned flow fields (FDAF),
  refines the aligned differences with a Mix-FFN and classifies them into 2 logits.

Differences from the authors' code: SyncBN is plain BatchNorm; Open-CD pads inputs to a multiple of 32
before the model, this model takes any size (the engine's tiles are multiples of 32 anyway).
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import register
from .backbone_weights import load_backbone_weights
from .heads import ConvBNReLU, classifier_conv, fuse_resized, resize
from ..inputs import optical_input


class SpatialExchange(nn.Module):
    """Swap every ``period``-th column (from column 0) between the two dates."""

    def __init__(self, period: int = 2):
        super().__init__()
        self.period = period

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        swap = torch.arange(x1.shape[-1], device=x1.device) % self.period == 0  # (W,)
        return torch.where(swap, x2, x1), torch.where(swap, x1, x2)


class ChannelExchange(nn.Module):
    """Swap every ``period``-th channel (from channel 0) between the two dates."""

    def __init__(self, period: int = 2):
        super().__init__()
        self.period = period

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        swap = (torch.arange(x1.shape[1], device=x1.device) % self.period == 0).view(-1, 1, 1)
        return torch.where(swap, x2, x1), torch.where(swap, x1, x2)


class NoExchange(nn.Module):
    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x1, x2


_EXCHANGES = {"none": NoExchange, "spatial": SpatialExchange, "channel": ChannelExchange}
# ChangerEx's choice, with p = 1/2 for every exchange.
CHANGER_EX_EXCHANGES = ("none", "spatial", "channel", "channel")


class InteractiveMiT(nn.Module):
    """A Siamese MiT whose two streams exchange features after each stage.

    ``encoder`` is timm's PVT-v2 model (classifier removed), so its parameters keep timm's names.
    """

    def __init__(self, variant: str, in_chans: int = 3, drop_path_rate: float = 0.1):
        super().__init__()
        # PVT-v2 defaults to MLP ratios (8, 8, 4, 4); MiT, which Changer uses, has 4 in every stage.
        self.encoder = timm.create_model(variant, pretrained=False, in_chans=in_chans, num_classes=0,
                                         mlp_ratios=4, drop_path_rate=drop_path_rate)
        self.exchanges = nn.ModuleList(_EXCHANGES[kind]() for kind in CHANGER_EX_EXCHANGES)
        self.widths = tuple(info["num_chs"] for info in self.encoder.feature_info)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x1, x2 = self.encoder.patch_embed(x1), self.encoder.patch_embed(x2)
        levels = []
        for stage, exchange in zip(self.encoder.stages, self.exchanges):
            x1, x2 = exchange(stage(x1), stage(x2))
            levels.append((x1, x2))
        return levels


class LevelFusion(nn.Module):
    """Project each level to ``channels``, resize to the finest level, concatenate, reduce to half."""

    def __init__(self, in_channels: tuple[int, ...], channels: int):
        super().__init__()
        self.projections = nn.ModuleList(ConvBNReLU(c, channels) for c in in_channels)
        self.fuse = ConvBNReLU(channels * len(in_channels), channels // 2)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return fuse_resized(self.fuse, [proj(x) for proj, x in zip(self.projections, levels)], levels[0].shape[-2:])


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``x`` at each pixel's position moved by ``flow`` (N, 2, H, W; x then y).

    As in Open-CD's FDAF, the flow is divided by the width / height (not half of it) before being added
    to the [-1, 1] sampling grid, and the grid spans the pixel centres (``align_corners=True``).
    """
    h, w = x.shape[-2:]
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2)
    offset = torch.stack((flow[:, 0] / w, flow[:, 1] / h), dim=-1)  # (N, H, W, 2)
    return F.grid_sample(x, grid + offset, mode="bilinear", padding_mode="zeros", align_corners=True)


class FlowDualAlignment(nn.Module):
    """FDAF: predict one flow per date from both, warp each date onto the other and subtract it.

    Returns ``[warp(x1) - x2, warp(x2) - x1]`` concatenated (2 x ``channels``).
    """

    def __init__(self, channels: int, kernel_size: int = 5):
        super().__init__()
        both = 2 * channels
        self.flow = nn.Sequential(
            nn.Conv2d(both, both, kernel_size, padding=kernel_size // 2, groups=both),
            nn.InstanceNorm2d(both),
            nn.GELU(),
            nn.Conv2d(both, 4, 1, bias=False),
        )

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        flow1, flow2 = self.flow(torch.cat([x1, x2], dim=1)).chunk(2, dim=1)
        return torch.cat([warp(x1, flow1) - x2, warp(x2, flow2) - x1], dim=1)


class ConvMixFFN(nn.Module):
    """SegFormer's Mix-FFN on a feature map (1x1, depthwise 3x3, GELU, 1x1) with a residual."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
            nn.GELU(),
            nn.Conv2d(hidden, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class ChangerHead(nn.Module):
    def __init__(self, in_channels: tuple[int, ...], channels: int = 128, num_classes: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.fusion = LevelFusion(in_channels, channels)  # shared by both dates
        self.align = FlowDualAlignment(channels // 2)
        self.refine = ConvMixFFN(channels, channels)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = classifier_conv(channels, num_classes)

    def forward(self, levels: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        # Each date goes through the fusion on its own, so BatchNorm sees per-date statistics in training.
        fused1 = self.fusion([x1 for x1, _ in levels])
        fused2 = self.fusion([x2 for _, x2 in levels])
        x = self.refine(self.align(fused1, fused2))
        return self.classifier(self.dropout(x))


class ChangerEx(nn.Module):
    """Changer with the MiT interaction backbone; 2 logits (no change, change) at the input size.

    In training mode it returns ``{"logits": ..., "logits_lowres": ...}``, the second being the head's
    1/4-resolution logits that MTKD's distillation loss compares with a teacher's.
    """

    def __init__(self, variant: str, in_chans: int = 3, drop_path_rate: float = 0.1):
        super().__init__()
        self.backbone = InteractiveMiT(variant, in_chans=in_chans, drop_path_rate=drop_path_rate)
        self.head = ChangerHead(self.backbone.widths)

    def forward(self, pre: torch.Tensor, post: torch.Tensor):
        lowres = self.head(self.backbone(pre, post))
        logits = resize(lowres, pre.shape[-2:])
        if self.training:
            return {"logits": logits, "logits_lowres": lowres}
        return logits

    def load_backbone_weights(self, path: str | Path) -> dict:
        """ImageNet MiT weights for the encoder from a local file (timm, SegFormer or mmseg names, see
        ``backbone_weights``); the exchanges have no weights and the head keeps its initialisation."""
        return load_backbone_weights(self.backbone.encoder, path)


def _paper(params_m: float, gflops: float, accuracy: str) -> dict:
    return {"params_m": params_m, "gflops": gflops, "gflops_input": 256,
            "source": "M2CD Table I / JL1-CD Table II", "accuracy": accuracy}


_INPUTS = (optical_input(3), optical_input(3))


@register("changer_mit_b0", activation="softmax", inputs=_INPUTS,
          paper=_paper(3.457, 1.741, "JL1-CD test mIoU 74.85, mFscore 80.98 (per image; MTKD 75.35 / 81.28); "
                                     "CAU-Flood mIoU 83.57, mF1 90.63"),
          description="Changer (ChangerEx) with a MiT-b0 encoder: feature exchange between dates, FDAF head")
def changer_mit_b0(in_chans: int = 3, drop_path_rate: float = 0.1) -> ChangerEx:
    return ChangerEx("pvt_v2_b0", in_chans=in_chans, drop_path_rate=drop_path_rate)


@register("changer_mit_b1", activation="softmax", inputs=_INPUTS,
          paper=_paper(13.355, 5.046, "JL1-CD test mIoU 75.94, mFscore 81.93 (per image; MTKD 76.15 / 82.13); "
                                      "CAU-Flood mIoU 84.06, mF1 90.95"),
          description="Changer (ChangerEx) with a MiT-b1 encoder: feature exchange between dates, FDAF head")
def changer_mit_b1(in_chans: int = 3, drop_path_rate: float = 0.1) -> ChangerEx:
    return ChangerEx("pvt_v2_b1", in_chans=in_chans, drop_path_rate=drop_path_rate)
