"""IWAE-k estimates of log p(x) against a linear-Gaussian model whose log p(x),
posterior and ELBO are known in closed form:

    z ~ N(0, I_2),   x | z ~ N(W z + b, sigma^2 I_3),
    p(x) = N(b, W W^T + sigma^2 I),   p(z|x) = N(mu_x, S),
    S = (I + W^T W / sigma^2)^-1,     mu_x = S W^T (x - b) / sigma^2.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyrovae.infer import evaluate_iwae, iwae_log_likelihood, log_importance_weights
from pyrovae.parts import IAFEncoder, VampPrior
from pyrovae.vae import build_vae

SIGMA = 0.5


@pytest.fixture
def linear_gaussian():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 2, generator=g)
    b = torch.randn(3, generator=g)
    x = torch.randn(4, 3, generator=g) * 2
    eye2 = torch.eye(2)
    S = torch.linalg.inv(eye2 + W.T @ W / SIGMA**2)

    def mu(x):
        return (x - b) @ W @ S / SIGMA**2  # (B, 2); S is symmetric

    log_px = dist.MultivariateNormal(b, W @ W.T + SIGMA**2 * torch.eye(3)).log_prob(x)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, SIGMA).to_event(1), obs=x)

    def posterior():
        return dist.MultivariateNormal(mu(x), S)

    def make_guide(shift: float, inflate: float):
        """q(z|x) = N(mu_x + shift, inflate^2 S): wider than the posterior (inflate^2 < 2
        keeps the importance weights' variance finite) and off centre."""

        def guide(x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", dist.MultivariateNormal(mu(x) + shift, inflate**2 * S))

        return guide, dist.MultivariateNormal(mu(x) + shift, inflate**2 * S)

    return dict(model=model, x=x, log_px=log_px, posterior=posterior, make_guide=make_guide)


def test_exact_posterior_gives_log_px_for_any_k_and_chunking(linear_gaussian):
    lg = linear_gaussian
    guide, _ = lg["make_guide"](0.0, 1.0)
    # with q = p(z|x) every weight equals p(x): the estimate is exact, per example
    for k, chunk in ((1, 1), (20, 7), (50, 100)):
        est = iwae_log_likelihood(lg["model"], guide, lg["x"], k, chunk_size=chunk)
        assert est.shape == (4,)
        torch.testing.assert_close(est, lg["log_px"], atol=1e-4, rtol=0)


def test_k1_equals_elbo_in_expectation(linear_gaussian):
    lg = linear_gaussian
    pyro.set_rng_seed(1)
    guide, q = lg["make_guide"](0.3, 1.2)
    elbo = lg["log_px"] - torch.distributions.kl_divergence(q, lg["posterior"]())
    n = 4000
    log_w = log_importance_weights(lg["model"], guide, lg["x"], n)  # each row: one L_1 draw per image
    se = log_w.std(0) / math.sqrt(n)
    assert ((log_w.mean(0) - elbo).abs() < 4 * se).all(), (log_w.mean(0), elbo, se)


def test_estimate_increases_with_k_on_average(linear_gaussian):
    lg = linear_gaussian
    pyro.set_rng_seed(2)
    guide, _ = lg["make_guide"](0.3, 1.2)
    repeats = 300
    log_w = log_importance_weights(lg["model"], guide, lg["x"], 100 * repeats)
    means, ses = [], []
    for k in (1, 10, 100):
        # repeats independent L_k per image from disjoint groups of k draws, averaged over images
        groups = log_w[: k * repeats].reshape(repeats, k, -1)
        draws = (torch.logsumexp(groups, 1) - math.log(k)).mean(1)
        means.append(draws.mean())
        ses.append(draws.std() / math.sqrt(repeats))
    for i in range(2):
        gap, se = means[i + 1] - means[i], math.hypot(ses[i], ses[i + 1])
        assert gap > 3 * se, (means, ses)
    assert means[-1] < lg["log_px"].mean() + 3 * ses[-1]


def test_converges_to_log_px(linear_gaussian):
    lg = linear_gaussian
    pyro.set_rng_seed(3)
    guide, _ = lg["make_guide"](0.3, 1.2)
    k = 20000
    log_w = log_importance_weights(lg["model"], guide, lg["x"], k)
    est = torch.logsumexp(log_w, 0) - math.log(k)
    # delta method: L_k - log p(x) ~ N(-v / 2k, v / k), v = Var(w / p(x))
    v = torch.exp(log_w - lg["log_px"]).var(0)
    tol = 4 * (v / k).sqrt() + v / (2 * k)
    assert ((est - lg["log_px"]).abs() < tol).all(), (est, lg["log_px"], tol)
    assert (tol < 0.1).all()  # the check is sharp, not vacuous


def test_evaluate_iwae_reports_nats_and_bits_per_dim(linear_gaussian):
    lg = linear_gaussian
    guide, _ = lg["make_guide"](0.0, 1.0)
    out = evaluate_iwae(lg["model"], guide, lg["x"], 5, batch_size=3, chunk_size=2)
    assert out["iwae"] == pytest.approx(lg["log_px"].mean().item(), abs=1e-4)
    assert out["iwae_bpd"] == pytest.approx(-out["iwae"] / (3 * math.log(2)))


def test_site_outside_the_data_plate_is_rejected():
    def model(x):
        s = pyro.sample("s", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(s[..., None] + torch.zeros_like(x), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.sample("s", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="site 's'"):
        log_importance_weights(model, guide, torch.zeros(3, 2), 4)


@pytest.mark.parametrize("bad", [dict(num_samples=0), dict(num_samples=3, chunk_size=0)])
def test_bad_sizes_are_value_errors(linear_gaussian, bad):
    guide, _ = linear_gaussian["make_guide"](0.0, 1.0)
    with pytest.raises(ValueError, match="must be >= 1"):
        iwae_log_likelihood(linear_gaussian["model"], guide, linear_gaussian["x"], **bad)


@pytest.mark.parametrize("parts", ["vamp-iaf", "flow-full"])
def test_vae_log_weights_average_to_pyros_trace_elbo(parts):
    """Per-image log-weights of a VAE (mixture prior over IAF posteriors, flow
    prior with a full-covariance guide) average to Pyro's own ELBO estimate."""
    pyro.set_rng_seed(6)
    if parts == "vamp-iaf":
        encoder = IAFEncoder(16, 3, (8,))
        vae = build_vae(16, 3, (8,), prior=VampPrior(encoder, num_pseudo=10), guide=encoder)
    else:
        vae = build_vae(16, 3, (8,), prior="flow", guide="full")
    x = torch.bernoulli(torch.full((5, 16), 0.3))
    n = 1000
    per_draw = log_importance_weights(vae.model, vae.guide, x, n).mean(1)  # (n,), averaged over images
    pyro_elbo = (
        -Trace_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=1).loss(vae.model, vae.guide, x) / 5
    )
    se = math.sqrt(2) * per_draw.std().item() / math.sqrt(n)  # both are means of n independent draws
    assert abs(per_draw.mean().item() - pyro_elbo) < 4 * se, (per_draw.mean().item(), pyro_elbo, se)
