"""One vocabulary for every model's bound: recon, kl_top, kl_layers, elbo, bpd,
and one conversion from nats to bits per dimension."""

import math
from types import SimpleNamespace

import pyro
import pytest
import torch

from pyrovae.diffusion.chain import DiffusionChain
from pyrovae.diffusion.denoisers import TimeMLP
from pyrovae.diffusion.schedule import NoiseSchedule
from pyrovae.infer.bound import Bound, bits_per_dim, bound_terms, metric_unit, prefixed
from pyrovae.infer.diffusion_elbo import DiffusionELBO
from pyrovae.recipes.diffusion import DiffusionRecipe
from pyrovae.recipes.vae import VAERecipe
from pyrovae.vae import build_vae


def test_bits_per_dim_is_nats_over_d_ln_2_and_checks_d():
    assert bits_per_dim(784 * math.log(2) * 1.5, 784) == pytest.approx(1.5)
    torch.testing.assert_close(bits_per_dim(torch.tensor([2 * math.log(2)]), 2), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="dim"):
        bits_per_dim(1.0, 0)


def test_bound_terms_and_prefixes_name_every_part():
    terms = bound_terms(-80.0, 5.0, 15.0, dim=784)
    assert terms == {
        "recon": -80.0,
        "kl_top": 5.0,
        "kl_layers": 15.0,
        "elbo": -100.0,
        "bpd": pytest.approx(100 / (784 * math.log(2))),
    }
    assert list(prefixed(bound_terms(-1.0, 0.5), "test")) == ["test_recon", "test_kl_top", "test_elbo"]
    assert {metric_unit("test_bpd"), metric_unit("train_loss_hybrid"), metric_unit("test_elbo")} == {
        "bits per dimension",
        "training loss (the objective's units, not a bound)",
        "nats per example",
    }


def test_vae_evaluate_reports_the_bound_s_names_and_bits_per_dim_for_a_pmf():
    pyro.set_rng_seed(0)
    vae = build_vae(16, 2, (8,))
    x = torch.bernoulli(torch.full((20, 16), 0.3))
    metrics = VAERecipe().evaluate(SimpleNamespace(test_particles=4, iwae_k=0), vae, x)
    assert set(metrics) == {"test_recon", "test_kl_top", "test_elbo", "test_bpd"}
    assert metrics["test_elbo"] == pytest.approx(metrics["test_recon"] - metrics["test_kl_top"])
    assert metrics["test_bpd"] == pytest.approx(-metrics["test_elbo"] / (16 * math.log(2)))
    # a density (continuous Bernoulli) has no bits/dim
    vae = build_vae(16, 2, (8,), likelihood="continuous-bernoulli")
    assert "test_bpd" not in VAERecipe().evaluate(SimpleNamespace(test_particles=2, iwae_k=0), vae, torch.rand(5, 16))


def test_diffusion_terms_agree_with_the_full_bound_in_expectation():
    torch.manual_seed(0)
    chain = DiffusionChain(
        TimeMLP(4, (16,), out_mult=2),
        NoiseSchedule(torch.tensor([0.1, 0.25, 0.4, 0.6])),
        4,
        "discretised",
        variance="learned",
    )
    x0 = torch.randint(0, 256, (6, 4)).float() / 127.5 - 1
    elbo, M = DiffusionELBO(num_particles=16), 30
    with torch.no_grad():
        bounds = [elbo.terms(chain.model, chain.guide_posterior, x0) for _ in range(M)]
        ours = torch.tensor([[b.recon.sum(), b.kl_top.sum(), b.kl_layers.sum()] for b in bounds], dtype=torch.float64)
        full = []
        for _ in range(M):
            b = chain.bound(x0.repeat(16, 1))
            full.append([b.recon.sum() / 16, b.kl_top.sum() / 16, b.kl_layers.sum() / 16])
        full = torch.tensor(full, dtype=torch.float64)
    for name, a, b in zip(("recon", "kl_top", "kl_layers"), ours.T, full.T):
        se = math.sqrt((a.var() + b.var()) / M)
        assert abs(a.mean() - b.mean()) < 4.5 * se + 1e-5 * abs(b.mean()), (
            name,
            a.mean(),
            b.mean(),
            se,
        )  # (+ float32 rounding)
    assert torch.equal(ours[:, 1], ours[:1, 1].expand(M))  # kl_top is exact


def test_diffusion_evaluate_reports_the_bound_s_names():
    torch.manual_seed(0)
    chain = DiffusionChain(TimeMLP(4, (8,)), NoiseSchedule.from_name("linear", 6), 4, "discretised")
    x0 = torch.randint(0, 256, (5, 4)).float() / 127.5 - 1
    metrics = DiffusionRecipe().evaluate(SimpleNamespace(test_particles=2), chain, x0)
    assert set(metrics) == {"test_recon", "test_kl_top", "test_kl_layers", "test_elbo", "test_bpd"}
    assert metrics["test_elbo"] == pytest.approx(
        metrics["test_recon"] - metrics["test_kl_top"] - metrics["test_kl_layers"]
    )


def _bound(B=3, dim=4):
    g = torch.Generator().manual_seed(0)
    kl_1, kl_2 = torch.rand(B, generator=g), torch.rand(B, generator=g)
    return Bound(
        recon=-torch.rand(B, generator=g) * 10,
        kl_top=kl_2,
        kl_layers=kl_1,
        layers={"kl_1": kl_1, "kl_2": kl_2},
        dim=dim,
    )


def test_bound_elbo_nats_and_bits_per_dim_are_the_closed_forms_per_example():
    b = _bound()
    torch.testing.assert_close(b.elbo(), b.recon - b.kl_top - b.kl_layers)
    torch.testing.assert_close(b.nats(), -b.elbo())
    torch.testing.assert_close(b.bpd(), -b.elbo() / (4 * math.log(2)))
    assert len(b) == 3


def test_bound_summary_has_the_vocabulary_of_bound_terms_and_the_per_layer_kls():
    b = _bound()
    summary = b.summary()
    assert list(summary) == ["recon", "kl_top", "kl_layers", "elbo", "bpd", "kl_1", "kl_2"]
    assert summary["elbo"] == pytest.approx(float(b.elbo().mean()))
    one_layer = Bound(
        recon=-torch.ones(2), kl_top=torch.ones(2), kl_layers=torch.zeros(()), layers={"kl_1": torch.ones(2)}
    )
    assert list(one_layer.summary()) == ["recon", "kl_top", "elbo", "kl_1"]
    assert one_layer.summary()["elbo"] == -2.0


def test_bound_cat_joins_batches_in_order_and_expands_scalar_terms():
    b1, b2 = _bound(3), _bound(2)
    joined = Bound.cat([b1, b2])
    torch.testing.assert_close(joined.elbo(), torch.cat([b1.elbo(), b2.elbo()]))
    torch.testing.assert_close(joined.layers["kl_2"], torch.cat([b1.layers["kl_2"], b2.layers["kl_2"]]))
    scalar = Bound(recon=-torch.ones(2), kl_top=torch.ones(2), kl_layers=torch.zeros(()))
    assert Bound.cat([scalar, scalar]).kl_layers.shape == (4,)


def test_bound_refuses_bad_terms_and_bits_per_dim_without_a_pmf():
    with pytest.raises(TypeError, match="Bound.recon"):
        Bound(recon=1.0, kl_top=torch.ones(1), kl_layers=torch.zeros(1))
    with pytest.raises(ValueError, match="Bound.dim"):
        Bound(recon=torch.ones(1), kl_top=torch.ones(1), kl_layers=torch.zeros(1), dim=0)
    with pytest.raises(ValueError, match="probability mass function"):
        Bound(recon=torch.ones(1), kl_top=torch.ones(1), kl_layers=torch.zeros(1)).bpd()
    with pytest.raises(ValueError, match="at least one"):
        Bound.cat([])
