"""The mixture of experts: top-k gating, its noise, the balancing loss, the mixed output, its trace for export,
gradients."""
from __future__ import annotations

import pytest
import torch

from geochange.engine.models.moe import MixtureOfExperts, load_balancing_loss


def test_gate_selects_exactly_k_experts_with_gates_summing_to_one():
    torch.manual_seed(0)
    moe = MixtureOfExperts(16, num_experts=4, top_k=2)
    x = torch.randn(500, 16)
    for training in (True, False):
        moe.train(training)
        routing = moe.gate_tokens(x)
        assert ((routing.gates > 0).sum(dim=1) == 2).all()
        torch.testing.assert_close(routing.gates.sum(dim=1), torch.ones(500))
        assert torch.equal(routing.gates.gather(1, routing.indices), routing.weights)


def test_eval_gating_is_clean_and_training_gating_is_noisy():
    torch.manual_seed(0)
    moe = MixtureOfExperts(16, num_experts=4, top_k=2)
    with torch.no_grad():
        moe.noise.fill_(1.0)  # a visible noise level (it starts at the 0.01 floor)
    x = torch.randn(500, 16)
    moe.eval()
    first, second = moe.gate_tokens(x), moe.gate_tokens(x)
    assert torch.equal(first.gates, second.gates)
    clean = moe.gate(x)
    expected = torch.zeros_like(clean).scatter(1, clean.topk(2, dim=1).indices,
                                               clean.topk(2, dim=1).values.softmax(dim=1))
    torch.testing.assert_close(first.gates, expected)
    moe.train()
    assert not torch.equal(moe.gate_tokens(x).gates, moe.gate_tokens(x).gates)


def test_balancing_loss_is_zero_for_uniform_gating_and_positive_otherwise():
    uniform = torch.full((4,), 10.0)
    assert load_balancing_loss(uniform, uniform) == 0
    skewed = torch.tensor([20.0, 10.0, 5.0, 5.0])
    assert load_balancing_loss(skewed, uniform) > 0
    assert load_balancing_loss(uniform, skewed) > 0
    # Per branch, summed: one unbalanced branch is enough.
    assert load_balancing_loss(torch.stack([uniform, skewed]), torch.stack([uniform, uniform])) > 0

    # Through the module: expert e looks along axis e; a token between two axes goes to those two
    # experts with gates 1/2 each. Every pair equally often: every expert gets the same share.
    moe = MixtureOfExperts(8, num_experts=4, top_k=2).eval()
    with torch.no_grad():
        moe.gate.projection.weight.copy_(torch.eye(4, 8))
        moe.gate.projection.bias.zero_()
        moe.gate.embeddings.copy_(torch.eye(4))
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    tokens = torch.zeros(len(pairs), 8)
    for t, (a, b) in enumerate(pairs):
        tokens[t, a] = tokens[t, b] = 1.0
    _, balanced = moe(tokens)
    assert balanced.abs() < 1e-6
    _, unbalanced = moe(tokens[:1].repeat(6, 1))  # all tokens to experts 0 and 1
    assert unbalanced > 0.01


def test_mixture_output_is_the_gated_sum_of_the_chosen_experts():
    torch.manual_seed(0)
    moe = MixtureOfExperts(16, num_experts=4, top_k=2).eval()
    x = torch.randn(2, 5, 7, 16)
    y, _ = moe(x)
    tokens = x.reshape(-1, 16)
    routing = moe.gate_tokens(tokens)
    dense = torch.stack([expert(tokens) for expert in moe.experts], dim=1)  # (T, E, C)
    expected = (routing.gates.unsqueeze(-1) * dense).sum(dim=1)
    torch.testing.assert_close(y.reshape(-1, 16), expected)


@pytest.mark.filterwarnings("ignore:.*torch.jit.trace.* is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the balancing loss's shape test, unused here
def test_a_trace_keeps_the_routed_experts_groups_free_for_export():
    """Traced on one set of tokens and run on another, routed otherwise, the trace gives the sparse mixture:
    no expert's group size is frozen at the trace's, and the tokens that fill a group up to its step add
    nothing. An expert overflowing (as in fp16) reaches its own tokens only."""
    torch.manual_seed(0)
    moe = MixtureOfExperts(16, num_experts=4, top_k=2).eval().requires_grad_(False)
    traced_on, run_on = torch.randn(1, 30, 16), torch.randn(2, 250, 16)
    with torch.no_grad():
        traced = torch.jit.trace(lambda x: moe(x)[0], traced_on)
        assert "aten::nonzero" in str(traced.graph)  # the trace took the routed path, not every expert

        routing = moe.gate_tokens(run_on.reshape(-1, 16))
        routed = torch.bincount(routing.indices.reshape(-1), minlength=4).tolist()
        run = []  # the rows each expert runs on
        hooks = [expert.register_forward_hook(lambda module, args, out: run.append(len(args[0])))
                 for expert in moe.experts]
        moe._mix_traced(run_on.reshape(-1, 16), routing)
        for hook in hooks:
            hook.remove()
        step = 2 * 500 // MixtureOfExperts.GROUP_STEPS  # (tokens x k) / steps
        assert all(n % step == 0 and n >= routed_n for n, routed_n in zip(run, routed)) and run != routed
        torch.testing.assert_close(traced(run_on), moe(run_on)[0], rtol=1e-6, atol=1e-6)
        moe.experts[0].fc2.bias.fill_(float("inf"))
        out, reached = traced(run_on).reshape(-1, 16), moe.gate_tokens(run_on.reshape(-1, 16)).gates[:, 0] > 0
        assert out[reached].isinf().all(dim=1).all() and out[~reached].isfinite().all()


def test_gradients_reach_every_expert_the_gate_and_the_temperature():
    torch.manual_seed(0)
    moe = MixtureOfExperts(16, num_experts=4, top_k=2).train()
    y, balance = moe(torch.randn(4, 8, 8, 16), branches=2)
    (y.square().mean() + balance).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert moe.gate.log_scale.grad.abs() > 0
    assert moe.gate.embeddings.grad.abs().sum() > 0
