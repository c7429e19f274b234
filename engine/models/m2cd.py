"""M2CD (Liu, Zhang, Wang and Gu): optical pre-event / SAR post-event change detection with a Siamese backbone
whose features pass through mixtures of experts, trained with an optical-to-SAR self-distillation path.

Structure as in the authors' code (circleLZY/M2CD):

* one backbone shared by both dates: MiT-b0 / b1 (timm ``pvt_v2_b0`` / ``pvt_v2_b1`` with MiT's MLP
  ratio 4, which makes them MiT parameter for parameter) or ConvNeXt-T / S / B;
* MiT: one :class:`MixtureOfExperts` after each stage, whose output replaces the stage's output (no
  residual, no norm) and feeds the next stage; ConvNeXt: mixtures in place of the MLP of selected blocks;
* the two dates' features concatenated channel-wise at every level, then a SegFormer (default), UPerNet or
  FCN head giving 2 logits (no change, change), upsampled to the input size;
* in training, O2SP: the pre-event image with simulated speckle (:func:`simulate_sar_speckle`) as a third
  path through the same backbone, whose features the two dates' features are pulled towards
  (:func:`o2sp_self_distillation_loss`). The authors use it with MiT only; the ConvNeXt variants accept
  it too.

Published sizes (Table I): the MiT figures are this implementation's to the thousandth. The ConvNeXt
figures count, in every MoE block, the dense MLP that the authors' block still builds but never calls
(15.9 M for -T, 26.6 M for -S, 47.2 M for -B); these models leave it out, so they are that much smaller.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.convnext import ConvNeXtBlock
from timm.layers import LayerNorm2d

from . import register
from .backbone_weights import load_backbone_weights
from ..inputs import optical_input, sar_input


# --- Mixture of experts ---------------------------------------------------------------------------

class CosineTopKGate(nn.Module):
    """Routing logits: cosine similarity between a projection of each token and one learned embedding
    per expert, scaled by a learned temperature."""

    def __init__(self, channels: int, num_experts: int, init_temperature: float = 0.5,
                 max_scale: float = 100.0):
        super().__init__()
        proj_dim = min(channels // 2, 256)
        self.projection = nn.Linear(channels, proj_dim)
        self.embeddings = nn.Parameter(torch.empty(proj_dim, num_experts).normal_(0.0, 0.01))
        self.log_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        similarity = F.normalize(self.projection(x), dim=1) @ F.normalize(self.embeddings, dim=0)
        return similarity * self.log_scale.clamp(max=self.max_log_scale).exp()


class ExpertMLP(nn.Sequential):
    """One expert: Linear(C, 4C) - GELU - Linear(4C, C) on each token (two 1x1 convolutions)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels)


class Routing(NamedTuple):
    indices: torch.Tensor  # (T, k) chosen experts of each token
    weights: torch.Tensor  # (T, k) their gates, summing to 1 per token
    gates: torch.Tensor  # (T, E) the same gates scattered over all experts, zero elsewhere
    load: torch.Tensor  # (T, E) each token's contribution to the experts' load


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation along the last dimension: 0 when all entries are equal."""
    if x.shape[-1] == 1:
        return x.new_zeros(x.shape[:-1])
    return x.var(dim=-1) / (x.mean(dim=-1) ** 2 + 1e-10)


def load_balancing_loss(importance: torch.Tensor, load: torch.Tensor,
                        weight: float = 0.01) -> torch.Tensor:
    """Shazeer et al. (2017): ``weight * (cv^2(importance) + cv^2(load))``, summed over leading
    (branch) dimensions. ``importance`` and ``load`` are ``(..., E)``."""
    return weight * (cv_squared(importance.float()) + cv_squared(load.float())).sum()


class MixtureOfExperts(nn.Module):
    """Per-token top-k mixture of :class:`ExpertMLP` experts with a noisy cosine gate.

    ``forward(x, branches)`` takes channels-last tokens ``(..., C)`` and returns the mixed tokens and the
    load-balancing loss, computed for each of ``branches`` equal consecutive blocks of the batch (the
    Siamese paths run as one batch, the authors' loss is per path) and summed.
    Training adds the learned Gaussian noise to the routing logits; evaluation routes on the clean
    logits, so it is deterministic. ``every_expert_on_gpu``: at inference on a GPU, mix with
    ``_mix_all`` (see there).
    """

    def __init__(self, channels: int, num_experts: int = 4, top_k: int = 2, hidden_ratio: int = 4,
                 noisy: bool = True, balance_weight: float = 0.01, every_expert_on_gpu: bool = False):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
        self.num_experts, self.top_k, self.every_expert_on_gpu = num_experts, top_k, every_expert_on_gpu
        self.noisy, self.balance_weight = noisy, balance_weight
        self.gate = CosineTopKGate(channels, num_experts)
        self.noise = nn.Parameter(torch.zeros(channels, num_experts))  # std = softplus(x @ noise) + 0.01
        self.experts = nn.ModuleList(ExpertMLP(channels, hidden_ratio * channels)
                                     for _ in range(num_experts))

    def route(self, x: torch.Tensor) -> Routing:
        """Route ``(T, C)`` tokens. Computed in float32 whatever the autocast: the top-k choice and the
        normal CDF of the load estimate are sensitive to rounding."""
        k, num_experts = self.top_k, self.num_experts
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            clean = self.gate(x)
            add_noise = self.training and self.noisy
            if add_noise:
                noise_std = F.softplus(x @ self.noise) + 0.01
                logits = clean + torch.randn_like(clean) * noise_std
            else:
                logits = clean
            # One logit past the top k: the threshold the load estimate needs.
            top_logits, top_indices = logits.topk(min(k + 1, num_experts), dim=1)
            indices = top_indices[:, :k]
            weights = top_logits[:, :k].softmax(dim=1)
            gates = torch.zeros_like(logits).scatter(1, indices, weights)
            if add_noise and k < num_experts:
                load = self._probability_in_top_k(clean, logits, noise_std, top_logits)
            else:
                load = (gates > 0).float()
        return Routing(indices, weights, gates, load)

    def _probability_in_top_k(self, clean, noisy_logits, noise_std, top_logits) -> torch.Tensor:
        """Smooth load estimate: the probability that each expert would still be among a token's top k
        if only its own noise were drawn again (Shazeer et al. 2017), differentiable in the gate."""
        k = self.top_k
        # To stay in, an expert must beat the (k+1)-th logit; to get in, the k-th.
        threshold_in, threshold_out = top_logits[:, k:k + 1], top_logits[:, k - 1:k]
        is_in = noisy_logits > threshold_in
        normal = torch.distributions.Normal(torch.zeros((), device=clean.device),
                                            torch.ones((), device=clean.device))
        return torch.where(is_in, normal.cdf((clean - threshold_in) / noise_std),
                           normal.cdf((clean - threshold_out) / noise_std))

    def _mix(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Run each expert on the tokens routed to it only (k experts per token, the compute the paper
        counts), then weight and sum each token's k outputs.

        Tokens are gathered by sorting the (token, slot) assignments by expert; only the loop over the
        experts is in Python. The group sizes depend on the routing, so torch.compile breaks the graph
        here (one host sync per call); ``_mix_all`` avoids that at E / k times the expert compute, which
        the published FLOPs do not include.
        The results are put back in place with ``index_copy`` (each row written once), so the sum over
        the k outputs has a fixed order: deterministic on GPU too. See ``_mix_all`` for inference on a GPU.
        """
        tokens, k = x.shape[0], self.top_k
        assignment_expert = routing.indices.reshape(-1)  # assignment a = token * k + slot
        order = assignment_expert.argsort(stable=True)
        group_sizes = torch.bincount(assignment_expert, minlength=self.num_experts).tolist()
        routed = x.index_select(0, order // k).split(group_sizes)
        outputs = torch.cat([expert(group) for expert, group in zip(self.experts, routed)])
        per_slot = outputs.new_empty(outputs.shape).index_copy(0, order, outputs)
        weights = routing.weights.to(per_slot.dtype).unsqueeze(-1)
        return (per_slot.view(tokens, k, -1) * weights).sum(dim=1)

    def _mix_all(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """What ``_mix`` returns, to rounding (the matrix products run over other token sets, and for
        k > 2 the sum's order differs), from every expert run on every token and weighted by its gate;
        an expert a token was not routed to adds exactly nothing, even where it overflows (fp16).

        Its shapes never depend on the routing: no host sync, so a model using it can be captured as
        a CUDA graph (one launch a batch instead of hundreds, each of which waits for Python's GIL
        beside the engine's reader and writer threads). It costs E / k times the expert compute: 10 %
        more FLOPs for M2CD-MiT-b0, 22 % for MiT-b1, whose kernels are too short to keep a GPU busy
        when launched one by one, so the MiT encoder uses it; 148 % for ConvNeXt-T (8 experts), 56 %
        for -S and 59 % for -B (torch's FLOP counter, 256 px pairs), whose long kernels hide the
        launches, so those stay on ``_mix``, eager.
        """
        mixed = 0
        for expert, gate in zip(self.experts, routing.gates.unbind(dim=1)):
            out = expert(x)
            gate = gate.to(out.dtype).unsqueeze(-1)
            mixed = mixed + torch.where(gate > 0, out * gate, 0)  # not inf x 0 = NaN
        return mixed

    def forward(self, x: torch.Tensor, branches: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.route(tokens)
        per_branch = (branches, -1, self.num_experts)
        balance = load_balancing_loss(routing.gates.view(per_branch).sum(1),
                                      routing.load.view(per_branch).sum(1), self.balance_weight)
        mix = self._mix_all if self.every_expert_on_gpu and x.is_cuda and not self.training else self._mix
        return mix(tokens, routing).view(shape), balance


# --- O2SP -----------------------------------------------------------------------------------------

def simulate_sar_speckle(x: torch.Tensor, generator: torch.Generator | None = None,
                         variance: int | None = None) -> torch.Tensor:
    """Simulated SAR from an (already normalised) optical image: ``x`` times fully developed speckle,
    Gamma noise of mean 1 and variance ``v`` (shape 1/v, scale v), i.i.d. per sample, channel and pixel.

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
        self.moe = nn.ModuleList(MixtureOfExperts(c, num_experts, top_k, every_expert_on_gpu=True)
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
        # MLP but never call it); the mixtures keep their initialisation.
        return load_backbone_weights(self.backbone, path,
                                     unused_prefixes=[f"{name}.mlp." for name in self.replaced],
                                     new_prefixes=[f"{name}.moe." for name in self.replaced])


# --- Heads ----------------------------------------------------------------------------------------

class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1):
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2,
                                   bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)  # mmseg's init of the last conv
    nn.init.zeros_(conv.bias)
    return conv


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


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
        self.classifier = _classifier(channels, num_classes)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        size = [2 * s for s in levels[0].shape[-2:]]
        x = torch.cat([_resize(proj(x), size) for proj, x in zip(self.projections, levels)], dim=1)
        return self.classifier(self.fuse(x))


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: the input pooled to each scale, projected, resized back, concatenated
    with the input."""

    def __init__(self, in_channels: int, channels: int, scales: tuple[int, ...]):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels)) for s in scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [_resize(branch(x), x.shape[-2:]) for branch in self.branches], dim=1)


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
        self.classifier = _classifier(channels, num_classes)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        laterals = [lateral(x) for lateral, x in zip(self.laterals, levels)]
        laterals.append(self.bottleneck(self.pooling(levels[-1])))
        for i in range(len(laterals) - 1, 0, -1):  # top-down: coarser levels added to finer ones
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [smooth(x) for smooth, x in zip(self.smooth, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        x = self.fuse(torch.cat([outs[0]] + [_resize(x, size) for x in outs[1:]], dim=1))
        return self.classifier(self.dropout(x))


class FCNHead(nn.Module):
    """mmseg's FCNHead on the coarsest level: two 3x3 conv + BN + ReLU, dropout, classifier."""

    def __init__(self, in_channels: tuple[int, ...], channels: int = 512, num_classes: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(ConvBNReLU(in_channels[-1], channels, 3),
                                   ConvBNReLU(channels, channels, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = _classifier(channels, num_classes)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(levels[-1])))


_HEADS = {"segformer": SegFormerHead, "upernet": UPerNetHead, "fcn": FCNHead}


# --- Model ----------------------------------------------------------------------------------------

class M2CD(nn.Module):
    """Siamese MoE encoder, channel concatenation of the dates at every level, decode head.

    ``model(pre, post)`` in eval mode: 2 logits at the input size. In training mode: a dict with
    ``logits`` and ``gate_loss`` (balancing losses of all paths); given ``o2sp=`` (the simulated-SAR
    version of ``pre``) it also runs that third path and adds ``features``, the per-level encoder
    features ``{"pre": [...], "post": [...], "o2sp": [...]}`` for :func:`o2sp_self_distillation_loss`.
    """

    def __init__(self, encoder: nn.Module, head: str = "segformer", num_classes: int = 2):
        super().__init__()
        if head not in _HEADS:
            raise ValueError(f"unknown head {head!r}; choose one of {', '.join(_HEADS)}")
        self.encoder = encoder
        self.head = _HEADS[head](tuple(2 * c for c in encoder.widths), num_classes=num_classes)

    def forward(self, pre: torch.Tensor, post: torch.Tensor, o2sp: torch.Tensor | None = None):
        if o2sp is not None and not self.training:
            raise ValueError("the O2SP path exists in training only")
        paths = [pre, post] if o2sp is None else [pre, post, o2sp]
        # All paths in one batch through the shared encoder; the balancing loss stays per path.
        levels, gate_loss = self.encoder(torch.cat(paths), branches=len(paths))
        per_path = [level.chunk(len(paths)) for level in levels]
        fused = [torch.cat([level[0], level[1]], dim=1) for level in per_path]
        logits = _resize(self.head(fused), pre.shape[-2:])
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
