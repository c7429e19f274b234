"""A per-token top-k mixture of experts with a noisy cosine gate (Shazeer et al. 2017), as M2CD uses it.

``MixtureOfExperts(channels)(x, branches)`` takes channels-last tokens and returns them mixed, with the
load-balancing loss that keeps the gate from favouring a few experts.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class CosineTopKGate(nn.Module):
    """Gate logits: cosine similarity between a projection of each token and one learned embedding
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


class TokenRouting(NamedTuple):
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
    Training adds the learned Gaussian noise to the gate logits; evaluation gates on the clean
    logits, so it is deterministic. ``every_expert_in_graphs``: at inference in a static graph (a CUDA
    graph, torch.compile), mix with ``_mix_all`` (see there). Traced for export, every mixture routes
    (``_mix_traced``).
    """

    GROUP_STEPS = 64  # an exported expert's group sizes: multiples of 1/GROUP_STEPS of the assignments

    def __init__(self, channels: int, num_experts: int = 4, top_k: int = 2, hidden_ratio: int = 4,
                 noisy: bool = True, balance_weight: float = 0.01, every_expert_in_graphs: bool = False):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
        self.num_experts, self.top_k, self.every_expert_in_graphs = num_experts, top_k, every_expert_in_graphs
        self.noisy, self.balance_weight = noisy, balance_weight
        self.gate = CosineTopKGate(channels, num_experts)
        self.noise = nn.Parameter(torch.zeros(channels, num_experts))  # std = softplus(x @ noise) + 0.01
        self.experts = nn.ModuleList(ExpertMLP(channels, hidden_ratio * channels)
                                     for _ in range(num_experts))

    def gate_tokens(self, x: torch.Tensor) -> TokenRouting:
        """Choose the experts of ``(T, C)`` tokens. Computed in float32 whatever the autocast: the top-k
        choice and the normal CDF of the load estimate are sensitive to rounding."""
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
        return TokenRouting(indices, weights, gates, load)

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

    def _mix(self, x: torch.Tensor, routing: TokenRouting) -> torch.Tensor:
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

    def _mix_all(self, x: torch.Tensor, routing: TokenRouting) -> torch.Tensor:
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

    def _mix_traced(self, x: torch.Tensor, routing: TokenRouting) -> torch.Tensor:
        """What ``_mix`` returns (each token through its k experts), in operations whose shapes a trace for
        export keeps free: each expert's tokens found with ``nonzero`` rather than counted on the host, each
        token's k outputs gathered from where their expert's group put them rather than scattered back.

        Each group is filled up to a multiple of 1/``GROUP_STEPS`` of the assignments with tokens not routed to
        the expert, whose outputs nothing gathers: OpenVINO builds kernels for each new group size, and with
        exact sizes nearly every window brought new ones (M2CD-MiT-b0, 512 px windows, bf16: 35 ms a window
        more than on sizes seen before, and memory growing by 8 MB a window). Figures: bench/results.md.
        """
        k, steps = self.top_k, self.GROUP_STEPS
        assignment = routing.indices.reshape(-1)  # assignment a = token * k + slot -> its expert
        # (A, E) in 0/1 integers: with booleans (~, &, |, a cumsum of them), OpenVINO 2026.4's export was wrong.
        chosen = F.one_hot(assignment, self.num_experts)
        count = chosen.sum(dim=0)
        total = count.sum()
        step = torch.div(total, steps, rounding_mode="floor").clamp(min=1)
        size = torch.minimum(torch.div(count + step - 1, step, rounding_mode="floor") * step, total)
        ranks, outputs = [], []
        for e, expert in enumerate(self.experts):
            spare = 1 - chosen[:, e]  # the first ``size - count`` of these fill the group
            member = chosen[:, e] + spare * (spare.cumsum(dim=0) <= size[e] - count[e]).to(spare.dtype)
            ranks.append(member.cumsum(dim=0) - 1)
            tokens = torch.div(member.nonzero().squeeze(1), k, rounding_mode="floor")
            outputs.append(expert(x.index_select(0, tokens)))
        # Where each assignment's output lies among the groups' outputs, concatenated in expert order.
        position = (torch.stack(ranks, dim=1) + size.cumsum(dim=0) - size).gather(1, assignment[:, None])
        position = position.view(-1, k)
        outputs = torch.cat(outputs)
        weights = routing.weights.to(outputs.dtype)
        mixed = 0
        for slot in range(k):
            mixed = mixed + outputs.index_select(0, position[:, slot]) * weights[:, slot:slot + 1]
        return mixed

    def forward(self, x: torch.Tensor, branches: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        routing = self.gate_tokens(tokens)
        per_branch = (branches, -1, self.num_experts)
        balance = load_balancing_loss(routing.gates.view(per_branch).sum(1),
                                      routing.load.view(per_branch).sum(1), self.balance_weight)
        if torch.jit.is_tracing() and not self.training:  # export: a trace would freeze ``_mix``'s group sizes
            return self._mix_traced(tokens, routing).view(shape), balance
        # A GPU runs as a captured CUDA graph, and torch.compile's graph would break at ``_mix``'s group sizes.
        static = x.is_cuda or torch.compiler.is_compiling()
        mix = self._mix_all if self.every_expert_in_graphs and static and not self.training else self._mix
        return mix(tokens, routing).view(shape), balance
