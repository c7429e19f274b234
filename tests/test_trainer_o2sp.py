"""M2CD training terms on real optical-SAR pairs: the MoE gate loss and the O2SP self-distillation loss
are part of the total loss with non-zero gradients; with lambda = 0 the run is the plain run. The
simulated speckle of the O2SP path."""
from __future__ import annotations

import pytest
import torch

from geochange.trainer.loop import Trainer
from geochange.trainer.losses import simulate_sar_speckle
from trainer_setup import first_batch, gradients, small_config

OPTICAL_SAR = {"data": {"optical_sar": True}}


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    def make(o2sp: float) -> Trainer:
        cfg = small_config(tmp_path_factory.mktemp("o2sp"), shared_data / "ombria", "m2cd_mit_b0",
                           loss={"o2sp": o2sp}, **OPTICAL_SAR)
        return Trainer(cfg)
    return {0.0: make(0.0), 1e-4: make(1e-4), 1.0: make(1.0)}


def test_gate_and_self_distillation_terms_have_gradients(runs):
    trainer = runs[1e-4]
    batch = first_batch(trainer)
    trainer.train_mode()
    torch.manual_seed(0)
    terms = trainer.losses(*batch)
    assert set(terms) == {"seg", "gate", "o2sp"}
    assert terms["gate"] > 0 and terms["o2sp"] > 0
    encoder = [p for p in trainer.module.encoder.parameters() if p.requires_grad]
    for name in ("gate", "o2sp"):
        grads = torch.autograd.grad(terms[name], encoder, retain_graph=True, allow_unused=True)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, name
    # The term is lambda x the L1 distances: lambda 1 gives 1e4 times lambda 1e-4 on the same pass.
    torch.manual_seed(0)
    strong = runs[1.0].losses(*batch)
    assert strong["o2sp"].item() == pytest.approx(terms["o2sp"].item() * 1e4, rel=1e-4)


def test_lambda_zero_is_the_plain_run(runs, shared_data, tmp_path):
    plain = Trainer(small_config(tmp_path, shared_data / "ombria", "m2cd_mit_b0", **OPTICAL_SAR))
    batch = first_batch(plain)
    zero = gradients(runs[0.0], batch)
    reference = gradients(plain, batch)
    assert all(torch.equal(zero[n], reference[n]) for n in reference)
    assert set(runs[0.0].losses(*batch)) == {"seg", "gate"}
    # ... and lambda > 0 changes them (the test can fail).
    with_o2sp = gradients(runs[1e-4], batch)
    assert any(not torch.equal(with_o2sp[n], reference[n]) for n in reference)


def test_speckle_is_seeded_per_iteration(runs):
    trainer = runs[1e-4]
    batch = first_batch(trainer)
    trainer.train_mode()

    def o2sp_term(iteration):
        trainer.iteration = iteration
        torch.manual_seed(0)
        return trainer.losses(*batch)["o2sp"].item()

    assert o2sp_term(3) == o2sp_term(3)
    assert o2sp_term(3) != o2sp_term(4)
    trainer.iteration = 0


@pytest.mark.parametrize("variance", [1, 20])
def test_speckle_has_mean_one_and_the_requested_variance(variance):
    ones = torch.ones(4, 1, 1000, 1000)
    speckle = simulate_sar_speckle(ones, torch.Generator().manual_seed(variance), variance=variance)
    assert abs(speckle.mean().item() - 1) < 0.01
    assert abs(speckle.var().item() / variance - 1) < 0.05
    assert (speckle >= 0).all()


def test_speckle_variance_is_drawn_once_per_call_from_1_to_20():
    x = torch.full((1, 3, 300, 300), 2.0)
    a = simulate_sar_speckle(x, torch.Generator().manual_seed(1))
    b = simulate_sar_speckle(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    variances = set()
    for seed in range(12):
        noise = simulate_sar_speckle(torch.ones(1, 2, 500, 500), torch.Generator().manual_seed(seed))
        variances.add(round(noise.var().item()))
    assert len(variances) > 3 and min(variances) >= 1 and max(variances) <= 21
