import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from pyrovae import data
from pyrovae.params import pyro_name
from pyrovae.vae import VAE, build_vae

X_DIM, Z_DIM, B = 12, 3, 5


@pytest.fixture
def vae():
    torch.manual_seed(1)
    return build_vae(X_DIM, Z_DIM, hidden=(8,))


@pytest.fixture
def x():
    return torch.bernoulli(torch.full((B, X_DIM), 0.3))


def test_model_trace_sites_and_shapes(vae, x):
    tr = poutine.trace(vae.model).get_trace(x)
    z, obs = tr.nodes["z"], tr.nodes["x"]
    assert not z["is_observed"] and obs["is_observed"]
    assert z["fn"].batch_shape == (B,) and z["fn"].event_shape == (Z_DIM,)
    assert obs["fn"].batch_shape == (B,) and obs["fn"].event_shape == (X_DIM,)
    assert [f.name for f in z["cond_indep_stack"]] == ["data"]


def test_guide_trace_sites_and_shapes(vae, x):
    tr = poutine.trace(vae.guide).get_trace(x)
    z = tr.nodes["z"]
    assert z["fn"].batch_shape == (B,) and z["fn"].event_shape == (Z_DIM,)
    assert z["value"].shape == (B, Z_DIM)
    assert [n for n in tr.stochastic_nodes if not site_is_subsample(tr.nodes[n])] == ["z"]


def test_model_log_joint_matches_hand_computation(vae, x):
    z = torch.randn(B, Z_DIM)
    tr = poutine.trace(poutine.condition(vae.model, data={"z": z})).get_trace(x)
    logits = vae.decoder(z)
    by_hand = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum() + (
        x * logits - torch.nn.functional.softplus(logits)
    ).sum()
    assert torch.allclose(tr.log_prob_sum(), by_hand, rtol=1e-5)


def test_trace_elbo_matches_expected_loglik_minus_closed_form_kl(vae, x):
    """E_q[log p(x|z)] - KL(q||N(0,I)) by our own Monte Carlo + the closed-form KL
    equals the mean of Pyro's Trace_ELBO within Monte Carlo error."""
    with torch.no_grad():
        q = vae.encoder(x)
        kl = kl_divergence(q, dist.Normal(torch.zeros(Z_DIM), 1.0).to_event(1)).sum()
        z = q.sample((20000,))
        loglik = vae.likelihood(vae.decoder(z)).log_prob(x).sum(-1)
        expected = loglik.mean() - kl
        n = 4000
        losses = torch.tensor([Trace_ELBO().loss(vae.model, vae.guide, x) for _ in range(n)])
    se = math.sqrt(losses.var().item() / n + loglik.var().item() / 20000)
    assert abs(-losses.mean().item() - expected.item()) < 4 * se


@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_stock_pyro_elbos_train_the_vae(vae, elbo):
    x = torch.bernoulli(torch.rand(64, X_DIM).round() * 0.8 + 0.1)
    svi = SVI(
        vae.model,
        vae.guide,
        Adam({"lr": 1e-2}),
        loss=elbo(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
    )
    before = sum(svi.evaluate_loss(x) for _ in range(20)) / 20
    for _ in range(150):
        svi.step(x)
    after = sum(svi.evaluate_loss(x) for _ in range(20)) / 20
    assert after < before - 0.1 * abs(before)


def test_svi_on_real_mnist_improves_the_test_elbo():
    ds = data.load_mnist5k().subset(1000, 200)
    x_test = data.binarize_test(ds.x_test, "dynamic")
    vae = build_vae(784, 10, hidden=(200,))
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), loss=Trace_ELBO())
    test_elbo = Trace_ELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    before = -test_elbo.loss(vae.model, vae.guide, x_test) / len(x_test)
    for _ in range(3):
        for xb, _ in data.make_loader(ds.x_train, batch_size=100):
            svi.step(data.binarize(xb, "dynamic"))
    after = -test_elbo.loss(vae.model, vae.guide, x_test) / len(x_test)
    assert after > before + 200  # from ~-543 nats at init to ~-200 after 30 steps


def test_parameters_of_every_part_reach_the_param_store(vae, x):
    poutine.trace(vae.guide).get_trace(x)
    names = set(pyro.get_param_store().keys())
    prefix = pyro_name(vae, "vae")  # each instance has its own name in the store
    assert {f"{prefix}$$${n}" for n, _ in vae.named_parameters()} <= names


def test_sample_reconstruct_encode_shapes_and_ranges(vae, x):
    assert vae.sample(7).shape == (7, X_DIM)
    r = vae.reconstruct(x)
    assert r.shape == x.shape and 0 <= r.min() and r.max() <= 1
    assert torch.allclose(vae.encode(x), vae.encoder(x).mean)


def test_a_users_own_prior_plugs_in(x):
    class ShiftedPrior(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = torch.nn.Parameter(torch.full((Z_DIM,), 2.0))

        def forward(self):
            return dist.Normal(self.loc, 1.0).to_event(1)

    base = build_vae(X_DIM, Z_DIM, hidden=(8,))
    vae = VAE(base.encoder, base.decoder, X_DIM, Z_DIM, prior=ShiftedPrior())
    z = torch.zeros(B, Z_DIM)
    tr = poutine.trace(poutine.condition(vae.model, data={"z": z})).get_trace(x)
    assert torch.allclose(tr.nodes["z"]["fn"].log_prob(z), dist.Normal(2.0, 1.0).log_prob(z).sum(-1))
    assert (
        f"{pyro_name(vae, 'vae')}$$$prior.loc" in pyro.get_param_store().keys()
    )  # SVI will train the prior's parameter


@pytest.mark.parametrize(
    "bad, err, match",
    [
        (torch.zeros(B, X_DIM + 1), ValueError, "shape"),
        (torch.zeros(0, X_DIM), ValueError, "empty"),
        (torch.zeros(B, X_DIM, dtype=torch.uint8), TypeError, "float"),
        ([[0.0] * X_DIM], TypeError, "Tensor"),
    ],
)
def test_bad_data_is_a_clear_error(vae, bad, err, match):
    with pytest.raises(err, match=match):
        vae.model(bad)


def test_bad_sizes_are_clear_errors():
    with pytest.raises(ValueError, match="z_dim"):
        build_vae(X_DIM, 0)
    with pytest.raises(ValueError, match="n must be"):
        build_vae(X_DIM, 2).sample(0)
