"""TinyCD (Codegoni et al., 2023): a 0.28 M-parameter siamese change detector.

The backbone is the first layers of EfficientNet-B4 (stem + blocks 0..2, at 1/2, 1/2, 1/4 and 1/8 of the input,
widths 48/24/32/56). timm's ``efficientnet_b4`` has exactly the layers of the torchvision slice the authors use,
so their weights map onto it one to one (``AUTHORS_RULES``, used by ``import-weights``).

Deviation: the authors end the classifier with a Sigmoid; this module returns the logit and the
engine applies the sigmoid (manifest activation ``sigmoid``), so that training can use a
numerically safer BCE-with-logits. Predictions are the same.
"""
from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from geochange.engine.checkpoints import Rule
from geochange.engine.inputs import optical_input
from geochange.engine.models import register
from geochange.engine.models.backbone_weights import efficientnet_rules, load_backbone_weights


class PixelwiseMLP(nn.Sequential):
    """1x1 convolutions, each followed by PReLU except, optionally, the last one."""

    def __init__(self, widths_in, widths_out, last_activation: bool = True):
        layers = []
        for i, (cin, cout) in enumerate(zip(widths_in, widths_out)):
            layers.append(nn.Conv2d(cin, cout, 1))
            if last_activation or i < len(widths_in) - 1:
                layers.append(nn.PReLU())
        super().__init__(*layers)


class InterleavedMix(nn.Module):
    """Interleave the channels of both dates (a0 b0 a1 b1 ...) and mix each pair with a grouped 3x3."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, padding=1, groups=channels_out)
        self.act = nn.PReLU()
        self.norm = nn.InstanceNorm2d(channels_out)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n, c, h, w = a.shape
        mixed = torch.stack((a, b), dim=2).reshape(n, 2 * c, h, w)
        return self.norm(self.act(self.conv(mixed)))


class MixingAttention(nn.Module):
    """Interleaved mix followed by a pixel-wise MLP down to one channel: a spatial attention mask."""

    def __init__(self, channels_in: int, channels_out: int, widths_in, widths_out):
        super().__init__()
        self.mix = InterleavedMix(channels_in, channels_out)
        self.mlp = PixelwiseMLP(widths_in, widths_out)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.mix(a, b))


class UpMask(nn.Module):
    """Upsample x2 (bilinear, corners aligned), multiply by the skip mask, then depthwise + pointwise."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(channels_in, channels_in, 3, padding=1, groups=channels_in), nn.PReLU(),
            nn.InstanceNorm2d(channels_in),
            nn.Conv2d(channels_in, channels_out, 1), nn.PReLU(), nn.InstanceNorm2d(channels_out),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.conv(x * mask)


class TinyCD(nn.Module):
    def __init__(self, in_chans: int = 3):
        super().__init__()
        effnet = timm.create_model("efficientnet_b4", pretrained=False, in_chans=in_chans)
        self.stem = nn.Sequential(effnet.conv_stem, effnet.bn1)
        self.stages = nn.ModuleList(effnet.blocks[:3])
        self.first_mix = MixingAttention(2 * in_chans, in_chans, [in_chans, 10, 5], [10, 5, 1])
        self.mixers = nn.ModuleList([
            MixingAttention(48, 24, [24, 12, 6], [12, 6, 1]),
            MixingAttention(64, 32, [32, 16, 8], [16, 8, 1]),
        ])
        self.deep_mix = InterleavedMix(112, 56)
        self.ups = nn.ModuleList([UpMask(56, 64), UpMask(64, 64), UpMask(64, 32)])
        self.classifier = PixelwiseMLP([32, 16, 8], [16, 8, 1], last_activation=False)

    def forward(self, pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        # Masks at 1/1, 1/2, 1/4 and the mixed deepest features at 1/8.
        skips = [self.first_mix(pre, post)]
        a, b = self.stem(pre), self.stem(post)
        for i, stage in enumerate(self.stages):
            a, b = stage(a), stage(b)
            if i < len(self.mixers):
                skips.append(self.mixers[i](a, b))
        x = self.deep_mix(a, b)
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return self.classifier(x)

    def load_backbone_weights(self, path) -> dict:
        """ImageNet weights for the EfficientNet-B4 layers TinyCD keeps, as its authors start (torchvision's
        weights): a timm ``efficientnet_b4`` state dict or torchvision's, from a local file. The file's later stages,
        head and classifier are dropped; the mixing and decoding layers keep their initialisation."""
        return load_backbone_weights(TinyCDBackbone(self), path, unused_prefixes=_PAST_TINYCD)


class TinyCDBackbone(nn.Module):
    """TinyCD's EfficientNet-B4 layers (the same modules) under timm's names, to load ImageNet weights into."""

    def __init__(self, tinycd: TinyCD):
        super().__init__()
        self.conv_stem, self.bn1 = tinycd.stem
        self.blocks = tinycd.stages


# timm's EfficientNet-B4 past the layers TinyCD keeps.
_PAST_TINYCD = (*(f"blocks.{i}." for i in range(3, 7)), "conv_head.", "bn2.", "classifier.")


@register("tinycd", activation="sigmoid", inputs=(optical_input(3), optical_input(3)),
          paper={"params_m": 0.285, "gflops": 1.448, "gflops_input": 256, "source": "M2CD Table I",
                 "accuracy": "LEVIR-CD F1 91.05 / IoU 83.57"},
          description="TinyCD, EfficientNet-B4 stages 0-3, mixing-mask attention (Codegoni et al. 2023)")
def tinycd(in_chans: int = 3) -> TinyCD:
    return TinyCD(in_chans=in_chans)


# --- The authors' checkpoints ----------------------------------------------------------------------

def _mlp(source: str, target: str) -> list[Rule]:
    """The authors' PixelwiseLinear (``_linears.i.{0,1}``) onto a flat Sequential (``2i``, ``2i+1``)."""
    return [(rf"{source}\._linears\.(\d)\.([01])\.(.+)",
             lambda m, value: [(f"{target}.{2 * int(m[1]) + int(m[2])}.{m[3]}", value)])]


# The authors' names (Tiny_model_4_CD, torchvision's EfficientNet) -> this module's (timm's EfficientNet).
AUTHORS_RULES: list[Rule] = [
    *efficientnet_rules("_backbone", ("stem.0", "stem.1"), "stages"),
    # Mixing blocks.
    (r"_first_mix\._mixing\._convmix\.0\.(.+)", r"first_mix.mix.conv.\1"),
    (r"_first_mix\._mixing\._convmix\.1\.(.+)", r"first_mix.mix.act.\1"),
    *_mlp(r"_first_mix\._linear", "first_mix.mlp"),
    (r"_mixing_mask\.([01])\._mixing\._convmix\.0\.(.+)", r"mixers.\1.mix.conv.\2"),
    (r"_mixing_mask\.([01])\._mixing\._convmix\.1\.(.+)", r"mixers.\1.mix.act.\2"),
    *_mlp(r"_mixing_mask\.0\._linear", "mixers.0.mlp"),
    *_mlp(r"_mixing_mask\.1\._linear", "mixers.1.mlp"),
    # The LEVIR file stores the deepest mixer as ``_mixing_mask.2._convmix``, the later WHU file as
    # ``_mixing_mask.2._mixing._convmix``: both are the same block.
    (r"_mixing_mask\.2\.(?:_mixing\.)?_convmix\.0\.(.+)", r"deep_mix.conv.\1"),
    (r"_mixing_mask\.2\.(?:_mixing\.)?_convmix\.1\.(.+)", r"deep_mix.act.\1"),
    (r"_up\.(\d)\._convolution\.([0134])\.(.+)", r"ups.\1.conv.\2.\3"),
    *_mlp(r"_classify", "classifier"),
]
