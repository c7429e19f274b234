"""M2CD (Liu, Zhang, Wang and Gu): optical pre-event / SAR post-event change detection with a Siamese backbone
whose features pass through mixtures of experts, trained with an optical-to-SAR self-distillation path.

Structure as in the authors' code (circleLZY/M2CD):

* one backbone shared by both dates: MiT-b0 / b1 (timm ``pvt_v2_b0`` / ``pvt_v2_b1`` with MiT's MLP
  ratio 4, which makes them MiT parameter for parameter) or ConvNeXt-T / S / B;
* MiT: one mixture of experts (``moe``) after each stage, whose output replaces the stage's output (no
  residual, no norm) and feeds the next stage; ConvNeXt: mixtures in place of the MLP of selected blocks;
* the two dates' features concatenated channel-wise at every level, then a SegFormer (default), UPerNet or
  FCN head (``heads``) giving 2 logits (no change, change), upsampled to the input size;
* in training, O2SP: the pre-event image with simulated speckle as a third path through the same
  backbone, whose features the two dates' features are pulled towards (the trainer's
  ``simulate_sar_speckle`` and ``o2sp_self_distillation_loss``). The authors use it with MiT only; the
  ConvNeXt variants accept it too.

Published sizes (Table I): the MiT figures are this implementation's to the thousandth. The ConvNeXt
figures count, in every MoE block, the dense MLP that the authors' block still builds but never calls
(15.9 M for -T, 26.6 M for -S, 47.2 M for -B); these models leave it out, so they are that much smaller.
"""
from __future__ import annotations

import math
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models.convnext import ConvNeXtBlock
from timm.layers import LayerNorm2d

from . import register
from .backbone_weights import load_backbone_weights
from .heads import HEADS, resize
from .moe import MixtureOfExperts
from ..inputs import optical_input, sar_input


# --- Encoders -------------------------------------------------------------------------------------

class MiTMoEEncoder(nn.Module):
    """MiT with a mixture of experts after each stage; returns the four mixed feature maps and the sum
    of the stages' balancing losses (the authors' sum over stages and paths). ``moe=False`` leaves the
    mixtures out: the plain siamese MiT of the paper's ablation (Table II), with a balancing loss of 0."""

    def __init__(self, variant: str, in_chans: int = 3, drop_path_rate: float = 0.1,
                 num_experts: int = 4, top_k: int = 2, moe: bool = True):
        super().__init__()
        # PVT-v2 defaults to MLP ratios (8, 8, 4, 4); MiT has 4 in every stage.
        self.backbone = timm.create_model(variant, pretrained=False, in_chans=in_chans, num_classes=0,
                                          mlp_ratios=4, drop_path_rate=drop_path_rate)
        self.widths = tuple(info["num_chs"] for info in self.backbone.feature_info)
        self.moe = nn.ModuleList(MixtureOfExperts(c, num_experts, top_k, every_expert_in_graphs=True)
                                 for c in self.widths) if moe else None

    def forward(self, x: torch.Tensor, branches: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self.backbone.patch_embed(x)
        features, losses = [], [x.new_zeros((), dtype=torch.float32)]
        for i, stage in enumerate(self.backbone.stages):
            x = stage(x)
            if self.moe is not None:
                x, loss = self.moe[i](x.permute(0, 2, 3, 1), branches)
                x = x.permute(0, 3, 1, 2)
                losses.append(loss)
            features.append(x)
        return features, torch.stack(losses).sum()

    def load_backbone_weights(self, path: str | Path) -> dict:
        return load_backbone_weights(self.backbone, path)


class ConvNeXtMoEBlock(nn.Module):
    """A ConvNeXt block whose MLP is a :class:`MixtureOfExperts` (the authors' ConvNeXt_MoE block)."""

    def __init__(self, block: ConvNeXtBlock, moe: MixtureOfExperts):
        super().__init__()
        # Reuse timm's modules so the parameters keep timm's names (conv_dw, norm, gamma).
        self.conv_dw, self.norm, self.gamma = block.conv_dw, block.norm, block.gamma
        self.drop_path = block.drop_path
        self.moe = moe

    def forward(self, x: torch.Tensor, branches: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        y, loss = self.moe(self.norm(self.conv_dw(x).permute(0, 2, 3, 1)), branches)
        y = y.permute(0, 3, 1, 2).mul(self.gamma.reshape(1, -1, 1, 1))
        return x + self.drop_path(y), loss


class ConvNeXtMoEEncoder(nn.Module):
    """ConvNeXt with mixtures in selected blocks and a LayerNorm on each stage's output; returns the four
    normalised feature maps and the mean of the MoE blocks' balancing losses (the authors average over
    blocks, where the MiT variants sum over stages)."""

    def __init__(self, variant: str, moe_blocks: tuple[tuple[int, ...], ...], in_chans: int = 3,
                 drop_path_rate: float = 0.1, num_experts: int = 4, top_k: int = 2):
        super().__init__()
        self.backbone = timm.create_model(variant, pretrained=False, in_chans=in_chans,
                                          drop_path_rate=drop_path_rate)
        self.backbone.prune_intermediate_layers(prune_norm=True, prune_head=True)  # keep all 4 stages
        self.widths = tuple(info["num_chs"] for info in self.backbone.feature_info)
        self.replaced = []  # names of the dense MLPs the mixtures replace
        for i, (stage, width) in enumerate(zip(self.backbone.stages, self.widths)):
            for j in moe_blocks[i]:
                if j < len(stage.blocks):  # the authors list 0..26 for ConvNeXt-T's 9-block stage
                    stage.blocks[j] = ConvNeXtMoEBlock(stage.blocks[j],
                                                       MixtureOfExperts(width, num_experts, top_k))
                    self.replaced.append(f"stages.{i}.blocks.{j}")
        self.out_norms = nn.ModuleList(LayerNorm2d(c, eps=1e-6) for c in self.widths)
        self._init_as_authors()

    def _init_as_authors(self) -> None:
        """The authors' start from random weights (their ConvNeXt_MoE.init_weights, run where no pretrained weights
        are given): every linear layer, the mixtures' experts and gate projections included, truncated normal with
        std 0.02; every convolution normal with std sqrt(2 / fan-out), fan-out = kernel area x out channels /
        groups (about 0.2 for the 7x7 depthwise ones, against timm's 0.02); biases 0. Norms and the gates' own
        parameters keep theirs."""
        # timm's init already gave its own linear layers that truncated normal: only the mixtures' are drawn again.
        mixtures = {id(m) for block in self.modules() if isinstance(block, MixtureOfExperts) for m in block.modules()}
        for module in self.modules():
            if isinstance(module, nn.Linear) and id(module) in mixtures:
                # Their truncation at +-2 is 100 std away: the plain normal, drawn several times faster.
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                nn.init.normal_(module.weight, std=math.sqrt(2.0 / fan_out))
            else:
                continue
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, branches: int = 1) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self.backbone.stem(x)
        features, losses = [], []
        for stage, norm in zip(self.backbone.stages, self.out_norms):
            x = stage.downsample(x)
            for block in stage.blocks:
                if isinstance(block, ConvNeXtMoEBlock):
                    x, loss = block(x, branches)
                    losses.append(loss)
                else:
                    x = block(x)
            features.append(norm(x))
        return features, torch.stack(losses).mean()

    def load_backbone_weights(self, path: str | Path) -> dict:
        # The file's dense MLPs of the MoE blocks have no place here (the authors' blocks keep such an
        # MLP but never call it); the mixtures keep their initialisation (``_init_as_authors``'s; the authors'
        # code, given a checkpoint, leaves them at torch's: their ConvNeXt configs give none).
        return load_backbone_weights(self.backbone, path,
                                     unused_prefixes=[f"{name}.mlp." for name in self.replaced],
                                     new_prefixes=[f"{name}.moe." for name in self.replaced])


# --- Model ----------------------------------------------------------------------------------------

class M2CD(nn.Module):
    """Siamese MoE encoder, channel concatenation of the dates at every level, decode head.

    ``model(pre, post)`` in eval mode: 2 logits at the input size. In training mode: a dict with
    ``logits`` and ``gate_loss`` (balancing losses of all paths); given ``o2sp=`` (the simulated-SAR
    version of ``pre``) it also runs that third path and adds ``features``, the per-level encoder
    features ``{"pre": [...], "post": [...], "o2sp": [...]}`` for the trainer's O2SP loss.
    """

    def __init__(self, encoder: nn.Module, head: str = "segformer", num_classes: int = 2):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {', '.join(HEADS)}")
        self.encoder = encoder
        self.head = HEADS[head](tuple(2 * c for c in encoder.widths), num_classes=num_classes)

    def forward(self, pre: torch.Tensor, post: torch.Tensor, o2sp: torch.Tensor | None = None):
        if o2sp is not None and not self.training:
            raise ValueError("the O2SP path exists in training only")
        paths = [pre, post] if o2sp is None else [pre, post, o2sp]
        # All paths in one batch through the shared encoder; the balancing loss stays per path.
        levels, gate_loss = self.encoder(torch.cat(paths), branches=len(paths))
        per_path = [level.chunk(len(paths)) for level in levels]
        fused = [torch.cat([level[0], level[1]], dim=1) for level in per_path]
        logits = resize(self.head(fused), pre.shape[-2:])
        if not self.training:
            return logits
        out = {"logits": logits, "gate_loss": gate_loss}
        if o2sp is not None:
            out["features"] = {name: [level[i] for level in per_path]
                               for i, name in enumerate(("pre", "post", "o2sp"))}
        return out

    def load_backbone_weights(self, path: str | Path) -> dict:
        """ImageNet weights for the backbone from a local file (see ``backbone_weights``); the mixtures
        and the head keep their initialisation."""
        return self.encoder.load_backbone_weights(path)


# --- Registry -------------------------------------------------------------------------------------

_INPUTS = (optical_input(3), sar_input(3))  # SAR grey replicated to 3 channels, as the authors do
# Blocks with a mixture per ConvNeXt stage, as in the authors' configs.
_CONVNEXT_MOE_BLOCKS = ((), (0, 2), tuple(range(0, 27, 2)), (0, 2))


def _paper(params_m: float, gflops: float, accuracy: str) -> dict:
    return {"params_m": params_m, "gflops": gflops, "gflops_input": 256, "source": "M2CD Table I",
            "accuracy": accuracy}


def _mit(variant: str, in_chans: int, head: str, drop_path_rate: float, num_experts: int,
         top_k: int, moe: bool) -> M2CD:
    return M2CD(MiTMoEEncoder(variant, in_chans, drop_path_rate, num_experts, top_k, moe), head)


def _convnext(variant: str, in_chans: int, head: str, drop_path_rate: float, num_experts: int,
              top_k: int) -> M2CD:
    return M2CD(ConvNeXtMoEEncoder(variant, _CONVNEXT_MOE_BLOCKS, in_chans, drop_path_rate,
                                   num_experts, top_k), head)


@register("m2cd_mit_b0", activation="softmax", inputs=_INPUTS,
          paper=_paper(6.989, 6.372, "CAU-Flood mIoU 84.35, mF1 91.14, OA 95.68"),
          description="M2CD, MiT-b0: MoE after each stage (4 experts, top-2), O2SP training")
def m2cd_mit_b0(in_chans: int = 3, head: str = "segformer", drop_path_rate: float = 0.1,
                num_experts: int = 4, top_k: int = 2, moe: bool = True) -> M2CD:
    return _mit("pvt_v2_b0", in_chans, head, drop_path_rate, num_experts, top_k, moe)


@register("m2cd_mit_b1", activation="softmax", inputs=_INPUTS,
          paper=_paper(26.481, 11.638, "CAU-Flood mIoU 85.66, mF1 91.96, OA 96.19"),
          description="M2CD, MiT-b1: MoE after each stage (4 experts, top-2), O2SP training")
def m2cd_mit_b1(in_chans: int = 3, head: str = "segformer", drop_path_rate: float = 0.1,
                num_experts: int = 4, top_k: int = 2, moe: bool = True) -> M2CD:
    return _mit("pvt_v2_b1", in_chans, head, drop_path_rate, num_experts, top_k, moe)


@register("m2cd_convnext_t", activation="softmax", inputs=_INPUTS,
          paper=_paper(157.224, 22.182, "CAU-Flood mIoU 81.26, mF1 89.09, OA 94.92"),
          description="M2CD, ConvNeXt-T: MoE in 9 blocks (8 experts, top-2)")
def m2cd_convnext_t(in_chans: int = 3, head: str = "segformer", drop_path_rate: float = 0.1,
                    num_experts: int = 8, top_k: int = 2) -> M2CD:
    return _convnext("convnext_tiny", in_chans, head, drop_path_rate, num_experts, top_k)


@register("m2cd_convnext_s", activation="softmax", inputs=_INPUTS,
          paper=_paper(158.281, 39.020, "CAU-Flood mIoU 81.77, mF1 89.45, OA 94.86"),
          description="M2CD, ConvNeXt-S: MoE in 18 blocks (4 experts, top-2)")
def m2cd_convnext_s(in_chans: int = 3, head: str = "segformer", drop_path_rate: float = 0.2,
                    num_experts: int = 4, top_k: int = 2) -> M2CD:
    return _convnext("convnext_small", in_chans, head, drop_path_rate, num_experts, top_k)


@register("m2cd_convnext_b", activation="softmax", inputs=_INPUTS,
          paper=_paper(280.240, 65.531, "CAU-Flood mIoU 81.22, mF1 89.09, OA 94.63"),
          description="M2CD, ConvNeXt-B: MoE in 18 blocks (4 experts, top-2)")
def m2cd_convnext_b(in_chans: int = 3, head: str = "segformer", drop_path_rate: float = 0.2,
                    num_experts: int = 4, top_k: int = 2) -> M2CD:
    return _convnext("convnext_base", in_chans, head, drop_path_rate, num_experts, top_k)
