"""TraceAnalyticKL_ELBO against closed forms and against Pyro's own estimators.

Monte Carlo comparisons use the standard error computed from the draws, with a
Bonferroni correction over the comparisons one test makes: each test fails with
probability at most ALPHA when the estimator is right (the seeds are fixed, so
the outcome is reproducible).
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.inspect import get_dependencies

from pyrovae.infer import TraceAnalyticKL_ELBO, make_elbo
from pyrovae.vae import build_vae

ALPHA = 1e-3


def z_critical(comparisons: int, alpha: float = ALPHA) -> float:
    """Two-sided normal critical value at family-wise level alpha over ``comparisons`` tests."""
    return torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - alpha / (2 * comparisons))).item()


def assert_means_equal(a: torch.Tensor, b: torch.Tensor, comparisons: int) -> None:
    """Column-wise: mean(a) == mean(b) (b a tensor of draws, or exact values)
    within z * the standard error of the difference."""
    se2 = a.var(0) / len(a)
    if b.dim() == a.dim():
        se2 = se2 + b.var(0) / len(b)
        b = b.mean(0)
    gap = (a.mean(0) - b).abs()
    bound = z_critical(comparisons) * se2.sqrt()
    assert (gap <= bound).all(), f"|difference| {gap.tolist()} exceeds bound {bound.tolist()}"


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield


# ---------------------------------------------------------------------------
# Linear-Gaussian model: z ~ N(0, I), x | z ~ N(W z + b, s^2 I), closed forms.


class LinearGaussian:
    d, D, s = 2, 3, 0.7

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.W = torch.randn(self.D, self.d, generator=g, dtype=torch.float64)
        self.b = torch.randn(self.D, generator=g, dtype=torch.float64)
        self.x = torch.randn(self.D, generator=g, dtype=torch.float64)

    def model(self):
        eye = torch.eye(self.d, dtype=torch.float64)
        z = pyro.sample("z", dist.MultivariateNormal(torch.zeros_like(eye[0]), scale_tril=eye))
        pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.s).to_event(1), obs=self.x)

    def guide_for(self, mu, scale_tril):
        return lambda: pyro.sample("z", dist.MultivariateNormal(mu, scale_tril=scale_tril))

    def posterior(self):
        """Exact p(z|x) = N(mu, Sigma), Sigma = (I + W^T W / s^2)^-1, mu = Sigma W^T (x - b) / s^2."""
        sigma = torch.linalg.inv(torch.eye(self.d, dtype=torch.float64) + self.W.T @ self.W / self.s**2)
        return sigma @ self.W.T @ (self.x - self.b) / self.s**2, sigma

    def log_evidence(self):
        """log p(x) = log N(x; b, W W^T + s^2 I)."""
        cov = self.W @ self.W.T + self.s**2 * torch.eye(self.D, dtype=torch.float64)
        return dist.MultivariateNormal(self.b, cov).log_prob(self.x).item()

    def elbo(self, mu, sigma):
        """E_q log N(x; Wz+b, s^2 I) - KL(N(mu, Sigma) || N(0, I)), with
        E_q log N(x; Wz+b, s^2 I) = log N(x; W mu + b, s^2 I) - tr(W Sigma W^T) / (2 s^2)."""
        expected_loglik = dist.Normal(self.W @ mu + self.b, self.s).log_prob(self.x).sum() - torch.trace(
            self.W @ sigma @ self.W.T
        ) / (2 * self.s**2)
        kl = 0.5 * (torch.trace(sigma) + mu @ mu - self.d - torch.logdet(sigma))
        return (expected_loglik - kl).item()


def elbo_draws(elbo_class, model, guide, n: int, *args, particles: int = 50, **kwargs) -> torch.Tensor:
    """n independent ELBO estimates, each the mean of ``particles`` vectorised
    draws: i.i.d. batch means whose spread gives the standard error."""
    elbo = elbo_class(num_particles=particles, vectorize_particles=True, **{"max_plate_nesting": 1, **kwargs})
    return torch.tensor([-elbo.loss(model, guide, *args) for _ in range(n)], dtype=torch.float64)


def test_conjugate_perturbed_guide_matches_closed_form_elbo():
    lg = LinearGaussian()
    mu, sigma = lg.posterior()
    mu = mu + torch.tensor([0.8, -0.5], dtype=torch.float64)
    scale_tril = torch.linalg.cholesky(sigma) * torch.tensor([[1.6, 0.0], [0.3, 0.5]], dtype=torch.float64)
    guide = lg.guide_for(mu, scale_tril)
    exact = torch.tensor(lg.elbo(mu, scale_tril @ scale_tril.T), dtype=torch.float64)
    analytic = elbo_draws(TraceAnalyticKL_ELBO, lg.model, guide, 60, particles=100)
    trace = elbo_draws(Trace_ELBO, lg.model, guide, 60, particles=100)
    # Sequential particles average draws with the same spread as vectorised ones.
    sequential = -TraceAnalyticKL_ELBO(num_particles=50).loss(lg.model, guide)
    assert_means_equal(analytic[:, None], exact, 3)
    assert_means_equal(trace[:, None], exact, 3)
    assert abs(sequential - exact.item()) <= z_critical(3) * analytic.std().item() * math.sqrt(100 / 50)


def test_conjugate_exact_posterior_gives_log_evidence_and_trace_elbo_has_zero_variance():
    lg = LinearGaussian()
    mu, sigma = lg.posterior()
    guide = lg.guide_for(mu, torch.linalg.cholesky(sigma))
    log_px = torch.tensor(lg.log_evidence(), dtype=torch.float64)
    assert lg.elbo(mu, sigma) == pytest.approx(log_px.item(), abs=1e-9)
    analytic = elbo_draws(TraceAnalyticKL_ELBO, lg.model, guide, 60, particles=100)
    trace = elbo_draws(Trace_ELBO, lg.model, guide, 5)
    assert_means_equal(analytic[:, None], log_px, 1)
    assert (trace - log_px).abs().max() < 1e-9
    # The closed-form KL does not make the estimator zero-variance here: the
    # expected log-likelihood is still sampled.
    assert analytic.std() > 0.01


# ---------------------------------------------------------------------------
# A small VAE with fixed random weights (170 parameters), far from its posterior.


def small_vae(prior=None):
    torch.manual_seed(3)
    vae = build_vae(6, 2, (8,))
    if prior is not None:
        vae.prior = prior
    x = torch.bernoulli(torch.full((4, 6), 0.5), generator=torch.Generator().manual_seed(4))
    return vae, x


def loss_and_gradient_draws(elbo_class, vae, x, n: int, particles: int = 10) -> tuple:
    """n independent (loss, flat gradient) estimates, each from ``particles``
    vectorised draws."""
    elbo = elbo_class(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    params = list(vae.parameters())
    losses, grads = [], []
    for _ in range(n):
        loss = elbo.differentiable_loss(vae.model, vae.guide, x)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        losses.append(loss.detach())
    return torch.stack(losses).double(), torch.stack(grads).double()


@pytest.fixture(scope="module")
def vae_draws():
    """Loss and gradient draws of both estimators on the small VAE (shared by two tests)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    vae, x = small_vae()
    with pyro.validation_enabled(True):
        draws = {
            name: loss_and_gradient_draws(elbo, vae, x, 200, particles=20)
            for name, elbo in (("analytic", TraceAnalyticKL_ELBO), ("trace", Trace_ELBO))
        }
    return draws


def test_vae_loss_and_gradient_projections_match_trace_elbo_in_expectation(vae_draws):
    (loss_a, grad_a), (loss_t, grad_t) = vae_draws["analytic"], vae_draws["trace"]
    directions = torch.randn(grad_a.shape[1], 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a = torch.cat([loss_a[:, None], grad_a @ directions], 1)
    t = torch.cat([loss_t[:, None], grad_t @ directions], 1)
    assert_means_equal(a, t, comparisons=5)


def test_vae_gradient_variance_is_lower_with_analytic_kl_at_initialisation(vae_draws):
    """Total gradient variance sum_j Var[g_j]; each estimate's standard error
    comes from the spread of the squared deviations."""

    def total_variance(grads):
        sq = ((grads - grads.mean(0)) ** 2).sum(1)
        return sq.mean(), sq.std() / math.sqrt(len(sq))

    (var_a, se_a), (var_t, se_t) = total_variance(vae_draws["analytic"][1]), total_variance(vae_draws["trace"][1])
    print(f"gradient variance ratio analytic / Trace_ELBO at init: {var_a / var_t:.3f}")
    assert var_a + z_critical(1) * se_a < var_t - z_critical(1) * se_t


def test_mixture_prior_falls_back_to_monte_carlo_and_matches_trace_elbo():
    """No KL(Normal || MixtureSameFamily) is registered: the z term is sampled."""
    mixture = MixturePrior(2)
    vae, x = small_vae(prior=mixture)
    analytic = TraceAnalyticKL_ELBO()
    z_terms = torch.tensor([analytic.terms(vae.model, vae.guide, x)["z"] for _ in range(5)])
    assert z_terms.std() > 0
    a = elbo_draws(TraceAnalyticKL_ELBO, vae.model, vae.guide, 60, x, particles=100)
    t = elbo_draws(Trace_ELBO, vae.model, vae.guide, 60, x, particles=100)
    assert_means_equal(a[:, None], t[:, None], 1)


class MixturePrior(torch.nn.Module):
    """p(z) = sum_k w_k N(z; m_k, I): three components in z_dim dimensions."""

    def __init__(self, z_dim: int):
        super().__init__()
        self.register_buffer("locs", torch.tensor([[-2.0], [0.0], [2.0]]).expand(3, z_dim).clone())

    def forward(self):
        components = dist.Normal(self.locs, torch.ones_like(self.locs)).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros_like(self.locs[:, 0])), components)


def test_registered_kl_term_is_exact_not_sampled():
    vae, x = small_vae()
    elbo = TraceAnalyticKL_ELBO()
    first, second = elbo.terms(vae.model, vae.guide, x), elbo.terms(vae.model, vae.guide, x)
    assert first["z"] == second["z"]
    assert first["x"] != second["x"]
    q, p = vae.encoder(x), vae.prior()
    assert first["z"] == pytest.approx(-torch.distributions.kl_divergence(q, p).sum().item(), rel=1e-6)


def scaled_and_masked(fn):
    mask = torch.tensor([True, False, True, True])
    return poutine.scale(poutine.mask(fn, mask=mask), scale=0.3)


@pytest.mark.parametrize("case", ["vae", "vae scaled and masked", "mixture prior", "vectorised particles"])
def test_agrees_with_trace_mean_field_elbo_on_the_same_draws(case):
    vae, x = small_vae(prior=MixturePrior(2) if case == "mixture prior" else None)
    model, guide = vae.model, vae.guide
    if case == "vae scaled and masked":
        model, guide = scaled_and_masked(model), scaled_and_masked(guide)
    kwargs = {"num_particles": 7, "vectorize_particles": True} if case == "vectorised particles" else {}
    params = list(vae.parameters())
    results = []
    for elbo in (TraceAnalyticKL_ELBO(**kwargs), TraceMeanField_ELBO(**kwargs)):
        pyro.set_rng_seed(7)
        with warnings.catch_warnings():
            # TraceMeanField_ELBO.differentiable_loss is the base Trace_ELBO one, whose
            # surrogate adds the analytic KL: the values below are compared, not warned about.
            loss = elbo.differentiable_loss(model, guide, x)
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (loss_a, grads_a), (loss_m, grads_m) = results
    assert loss_a.item() == pytest.approx(loss_m.item(), rel=1e-5)
    for ga, gm in zip(grads_a, grads_m):
        torch.testing.assert_close(ga, gm, rtol=1e-4, atol=1e-6)


def test_scale_multiplies_every_term():
    vae, x = small_vae()
    elbo = TraceAnalyticKL_ELBO()
    pyro.set_rng_seed(8)
    plain = elbo.terms(vae.model, vae.guide, x)
    pyro.set_rng_seed(8)
    scaled = elbo.terms(poutine.scale(vae.model, scale=2.5), poutine.scale(vae.guide, scale=2.5), x)
    assert scaled == pytest.approx({k: 2.5 * v for k, v in plain.items()}, rel=1e-6)


# ---------------------------------------------------------------------------
# Subsampled plates: N data points, local z_n and a global theta.


class SubsampledLinearGaussian:
    """theta ~ N(0, 1); z_n ~ N(0, I); x_n | z_n, theta ~ N(W z_n + theta, s^2 I),
    guide q(theta) q(z_n) with free per-point means and scales."""

    N, d, D, s = 6, 2, 3, 0.8

    def __init__(self, subsample_size=None):
        g = torch.Generator().manual_seed(9)
        self.W = torch.randn(self.D, self.d, generator=g)
        self.m = 2 * torch.randn(self.N, self.d, generator=g)
        self.v = torch.rand(self.N, self.d, generator=g) + 0.3
        self.a, self.t = torch.tensor(0.4), torch.tensor(0.6)
        # Data close to the guide's predictions and guide means far from the
        # prior's: the local KLs are large and vary less across subsamples than
        # the log-likelihoods would otherwise, so a wrong N/B scale shows.
        self.x = self.m @ self.W.T + self.a + 0.3 * torch.randn(self.N, self.D, generator=g)
        self.subsample_size = subsample_size

    def model(self):
        theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
        with pyro.plate("data", self.N, subsample_size=self.subsample_size) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(self.d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + theta.unsqueeze(-1), self.s).to_event(1), obs=self.x[idx])

    def guide(self):
        pyro.sample("theta", dist.Normal(self.a, self.t))
        with pyro.plate("data", self.N, subsample_size=self.subsample_size) as idx:
            pyro.sample("z", dist.Normal(self.m[idx], self.v[idx].sqrt()).to_event(1))

    def elbo(self) -> float:
        """Full-data closed form: E_q log N(x_n; W z_n + theta, s^2 I)
        = log N(x_n; W m_n + a, s^2 I) - (tr(W V_n W^T) + D t^2) / (2 s^2), minus the KLs."""
        W, s = self.W.double(), self.s
        mean = self.m.double() @ W.T + self.a
        loglik = dist.Normal(mean, s).log_prob(self.x.double()).sum()
        loglik -= (((W**2) @ self.v.double().T).sum() + self.N * self.D * self.t**2) / (2 * s**2)
        kl_z = 0.5 * (self.v + self.m**2 - 1 - self.v.log()).sum()
        kl_theta = 0.5 * (self.t**2 + self.a**2 - 1 - 2 * self.t.log())
        return (loglik - kl_z - kl_theta).item()


def test_subsampled_plate_expectation_equals_full_data_elbo():
    full = SubsampledLinearGaussian()
    sub = SubsampledLinearGaussian(subsample_size=2)
    exact = torch.tensor(full.elbo(), dtype=torch.float64)
    full_draws = elbo_draws(TraceAnalyticKL_ELBO, full.model, full.guide, 100)
    # Each vectorised particle draws its own subsample (the plate sits inside the particle plate).
    sub_draws = elbo_draws(TraceAnalyticKL_ELBO, sub.model, sub.guide, 300)
    assert_means_equal(full_draws[:, None], exact, 2)
    assert_means_equal(sub_draws[:, None], exact, 2)


def test_subsample_scale_multiplies_local_kl_and_not_global():
    sub = SubsampledLinearGaussian(subsample_size=2)
    guide_trace = poutine.trace(sub.guide).get_trace()
    idx = guide_trace.nodes["data"]["value"]
    with poutine.replay(trace=guide_trace):
        terms = TraceAnalyticKL_ELBO().terms(sub.model, sub.guide)
    kl_z = 0.5 * (sub.v[idx] + sub.m[idx] ** 2 - 1 - sub.v[idx].log()).sum()
    kl_theta = 0.5 * (sub.t**2 + sub.a**2 - 1 - 2 * sub.t.log())
    assert terms["z"] == pytest.approx(-(sub.N / 2) * kl_z.item(), rel=1e-5)
    assert terms["theta"] == pytest.approx(-kl_theta.item(), rel=1e-5)


# ---------------------------------------------------------------------------
# terms(), kl_scale, registry.


@pytest.mark.parametrize("kl_scale", [1.0, 0.25])
def test_terms_sum_to_the_elbo_and_kl_scale_weights_only_latent_terms(kl_scale):
    vae, x = small_vae()
    elbo = TraceAnalyticKL_ELBO(kl_scale=kl_scale, num_particles=3)
    pyro.set_rng_seed(10)
    terms = elbo.terms(vae.model, vae.guide, x)
    pyro.set_rng_seed(10)
    loss = elbo.loss(vae.model, vae.guide, x)
    assert set(terms) == {"x", "z"}
    assert -loss == pytest.approx(terms["x"] + kl_scale * terms["z"], rel=1e-6)
    if kl_scale == 1.0:
        assert -loss == pytest.approx(sum(terms.values()), rel=1e-6)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), "1", True])
def test_kl_scale_must_be_a_nonnegative_number(bad):
    with pytest.raises(ValueError, match="kl_scale"):
        TraceAnalyticKL_ELBO(kl_scale=bad)


def test_registry_makes_it_by_name():
    elbo = make_elbo("analytic", num_particles=2)
    assert isinstance(elbo, TraceAnalyticKL_ELBO) and elbo.num_particles == 2


# ---------------------------------------------------------------------------
# The dependency condition: Monte Carlo exactly where the closed form is biased.


def chain_model():
    z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
    z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
    pyro.sample("x", dist.Normal(z2, 1.0), obs=torch.tensor(0.5))


def dependent_guide():
    """z2 first, then z1 from z2: the model's parent z1 of z2 is a guide descendant of z2."""
    z2 = pyro.sample("z2", dist.Normal(0.3, 0.8))
    pyro.sample("z1", dist.Normal(z2, 0.5))


def dependent_guide_elbo() -> float:
    """Exact ELBO of ``chain_model`` under ``dependent_guide``: z2 ~ N(0.3, 0.64),
    z1 = z2 + 0.5 e, so E z1^2 = 0.98, E (z2 - z1)^2 = 0.25, E (0.5 - z2)^2 = 0.68,
    and -E log q is the entropy 0.5 log(2 pi e 0.64) + 0.5 log(2 pi e 0.25)."""
    log2pi = math.log(2 * math.pi)
    expected_log_p = -1.5 * log2pi - 0.5 * (0.98 + 0.25 + 0.68)
    entropy = 0.5 * (log2pi + 1 + math.log(0.64)) + 0.5 * (log2pi + 1 + math.log(0.25))
    return expected_log_p + entropy


@pytest.mark.parametrize("validate", [True, False], ids=["validation on", "validation off"])
def test_out_of_order_dependency_takes_monte_carlo_there_warns_once_and_is_unbiased(validate):
    exact = torch.tensor(dependent_guide_elbo(), dtype=torch.float64)
    elbo = TraceAnalyticKL_ELBO(num_particles=200, vectorize_particles=True, max_plate_nesting=0)
    with pyro.validation_enabled(validate):
        with pytest.warns(UserWarning, match=r"biased at sites \['z2'\]"):
            terms = elbo.terms(chain_model, dependent_guide)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per (model, guide) pair
            draws = torch.tensor([-elbo.loss(chain_model, dependent_guide) for _ in range(100)], dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            biased = elbo_draws(TraceMeanField_ELBO, chain_model, dependent_guide, 100, particles=200)
    assert terms.closed_form == ("z1",)
    assert_means_equal(draws[:, None], exact, 2)
    # the closed form at z2 (TraceMeanField_ELBO's) is off by more than the tolerance: the test can fail
    with pytest.raises(AssertionError):
        assert_means_equal(biased[:, None], exact, 2)


@pytest.mark.parametrize("validate", [True, False], ids=["validation on", "validation off"])
def test_diffusion_chain_guide_forward_is_unbiased_and_guide_posterior_all_closed_form(validate):
    """The 4-step chain: under ``guide_forward`` x_{t+1} is the model parent of
    x_t and drawn after it, so only the top x_4 keeps its closed form; under
    ``guide_posterior`` (the model's order) every site does, without a warning."""
    from pyrovae.diffusion.chain import DiffusionChain
    from pyrovae.diffusion.denoisers import TimeMLP
    from pyrovae.diffusion.schedule import NoiseSchedule

    torch.manual_seed(0)
    chain = DiffusionChain(
        TimeMLP(2, (16, 16), time_dim=8), NoiseSchedule(torch.tensor([0.1, 0.25, 0.4, 0.6])), 2, "gaussian"
    )
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    with pyro.validation_enabled(validate):
        elbo = TraceAnalyticKL_ELBO(num_particles=500, vectorize_particles=True, max_plate_nesting=1)
        with pytest.warns(UserWarning, match=r"biased at sites \['x_1', 'x_2', 'x_3'\]"):
            assert elbo.terms(chain.model, chain.guide_forward, x0).closed_form == ("x_4",)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            forward = torch.tensor(
                [-elbo.loss(chain.model, chain.guide_forward, x0) for _ in range(20)], dtype=torch.float64
            )
            assert elbo.terms(chain.model, chain.guide_posterior, x0).closed_form == ("x_4", "x_3", "x_2", "x_1")
            posterior = elbo_draws(TraceAnalyticKL_ELBO, chain.model, chain.guide_posterior, 20, x0, particles=500)
        trace = elbo_draws(Trace_ELBO, chain.model, chain.guide_forward, 20, x0, particles=500)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            biased = elbo_draws(TraceMeanField_ELBO, chain.model, chain.guide_forward, 20, x0, particles=500)
    assert_means_equal(forward[:, None], trace[:, None], 2)
    assert_means_equal(posterior[:, None], trace[:, None], 2)
    with pytest.raises(AssertionError):
        assert_means_equal(biased[:, None], trace[:, None], 2)


def test_different_order_without_dependency_keeps_the_closed_form_silently():
    def guide():
        pyro.sample("z2", dist.Normal(0.3, 0.8))
        pyro.sample("z1", dist.Normal(-0.2, 0.5))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        terms = TraceAnalyticKL_ELBO().terms(chain_model, guide)
    assert set(terms.closed_form) == {"z1", "z2"}


def test_dependencies_that_cannot_be_worked_out_take_monte_carlo_at_every_out_of_order_site(monkeypatch):
    from pyrovae.infer import analytic_elbo

    def fail(*args, **kwargs):
        raise NotImplementedError("untraceable")

    monkeypatch.setattr(analytic_elbo, "get_dependencies", fail)

    def guide():  # z2 does not depend on z1 here, but that cannot be known
        pyro.sample("z2", dist.Normal(0.3, 0.8))
        pyro.sample("z1", dist.Normal(-0.2, 0.5))

    with pytest.warns(
        UserWarning, match=r"\['z2'\] \(their dependencies could not be worked out \(NotImplementedError: untraceable"
    ):
        terms = TraceAnalyticKL_ELBO().terms(chain_model, guide)
    assert terms.closed_form == ("z1",)


def test_dependencies_are_worked_out_once_per_model_guide_pair(monkeypatch):
    from pyrovae.infer import analytic_elbo

    calls = []

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return get_dependencies(fn, *args, **kwargs)

    monkeypatch.setattr(analytic_elbo, "get_dependencies", counting)
    elbo = TraceAnalyticKL_ELBO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            elbo.loss(chain_model, dependent_guide)
    assert calls == [chain_model, dependent_guide]


# ---------------------------------------------------------------------------
# Non-reparameterised guide sites: Trace_ELBO's score-function surrogate.


class DiscreteGaussian:
    """k_n ~ Bernoulli(sigmoid(a)), z_n | k_n ~ N(2 k_n - 1, 1), x_n | z_n ~ N(z_n, 0.5^2);
    guide q(k_n) = Bernoulli(sigmoid(l_n)), q(z_n | k_n) = N(m_n + c k_n, exp(2 s_n)).
    k takes the score function, z the closed-form KL (its parent k is drawn
    before it in both programs)."""

    N = 8

    def __init__(self, subsample_size=None):
        g = torch.Generator().manual_seed(11)
        self.x = 2 * torch.randn(self.N, generator=g)
        self.a = torch.tensor(0.3, requires_grad=True)
        self.logit = (0.5 * torch.randn(self.N, generator=g)).requires_grad_()
        self.m = torch.randn(self.N, generator=g).requires_grad_()
        self.c = torch.tensor(1.0, requires_grad=True)
        self.log_s = torch.full((self.N,), -0.5, requires_grad=True)
        self.params = [self.a, self.logit, self.m, self.c, self.log_s]
        self.subsample_size = subsample_size

    def model(self):
        with pyro.plate("data", self.N, subsample_size=self.subsample_size) as idx:
            k = pyro.sample("k", dist.Bernoulli(logits=self.a))
            z = pyro.sample("z", dist.Normal(2 * k - 1, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=self.x[idx])

    def guide(self):
        with pyro.plate("data", self.N, subsample_size=self.subsample_size) as idx:
            k = pyro.sample("k", dist.Bernoulli(logits=self.logit[idx]))
            pyro.sample("z", dist.Normal(self.m[idx] + self.c * k, self.log_s[idx].exp()))


def surrogate_draws(elbo_class, m, n: int, particles: int = 10) -> tuple:
    elbo = elbo_class(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    losses, grads = [], []
    for _ in range(n):
        loss = elbo.differentiable_loss(m.model, m.guide)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, m.params)]))
        losses.append(loss.detach())
    return torch.stack(losses).double(), torch.stack(grads).double()


@pytest.mark.parametrize("subsample_size", [None, 3], ids=["full plate", "subsampled plate"])
def test_discrete_latent_loss_and_gradient_match_trace_elbo_in_expectation(subsample_size):
    m = DiscreteGaussian(subsample_size)
    terms = TraceAnalyticKL_ELBO().terms(m.model, m.guide)
    assert terms.closed_form == ("z",)
    (loss_a, grad_a), (loss_t, grad_t) = (
        surrogate_draws(TraceAnalyticKL_ELBO, m, 200),
        surrogate_draws(Trace_ELBO, m, 200),
    )
    a = torch.cat([loss_a[:, None], grad_a], 1)
    t = torch.cat([loss_t[:, None], grad_t], 1)
    assert_means_equal(a, t, comparisons=a.shape[1])


def test_discrete_latent_gradient_variance_is_at_most_1_5_times_trace_elbos():
    """Per-index log-weights: a batch-total log-weight (also unbiased) has
    about 20 times Trace_ELBO's variance on this 8-point plate, and fails this."""
    m = DiscreteGaussian()
    var_a = surrogate_draws(TraceAnalyticKL_ELBO, m, 100)[1].var(0).sum()
    var_t = surrogate_draws(Trace_ELBO, m, 100)[1].var(0).sum()
    print(f"gradient variance ratio analytic / Trace_ELBO with a discrete latent: {var_a / var_t:.3f}")
    assert var_a <= 1.5 * var_t


# ---------------------------------------------------------------------------
# Masks and scales of every kind Pyro accepts.

MASK = torch.tensor([True, False, True, True])


def masked_programs(case: str):
    """A model z_ij ~ N(p, 1), x_ij ~ N(z_ij, 1) over plates (3, 4) and a Normal
    guide, masked or scaled as ``case`` says; and the per-index weight w that
    multiplies each KL term."""
    g = torch.Generator().manual_seed(12)
    p, q_loc, q_scale, x = (
        torch.randn(3, 4, generator=g),
        torch.randn(3, 4, generator=g),
        torch.rand(3, 4, generator=g) + 0.3,
        torch.randn(3, 4, generator=g),
    )
    wrap = {"dist": lambda d: d.mask(MASK)} if case == "Distribution.mask(tensor)" else {}
    if case == "Distribution.mask(False)":
        wrap = {"dist": lambda d: d.mask(False)}
    dist_mask = wrap.get("dist", lambda d: d)

    def model():
        with pyro.plate("rows", 3, dim=-2), pyro.plate("cols", 4, dim=-1):
            z = pyro.sample("z", dist_mask(dist.Normal(p, 1.0)))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide():
        with pyro.plate("rows", 3, dim=-2), pyro.plate("cols", 4, dim=-1):
            pyro.sample("z", dist_mask(dist.Normal(q_loc, q_scale)))

    weight = torch.ones(3, 4)
    if case in ("poutine.mask (broadcast)", "Distribution.mask(tensor)"):
        weight = MASK.float().expand(3, 4)
    elif case == "Distribution.mask(False)":
        weight = torch.zeros(3, 4)
    elif case == "poutine.scale":
        weight = torch.full((3, 4), 0.3)
    elif case == "poutine.scale (tensor)":
        weight = torch.tensor([[0.5], [1.0], [2.0]]).expand(3, 4)
    if case == "poutine.mask (broadcast)":  # a (4,) mask over the (3, 4) plates
        model, guide = poutine.mask(model, mask=MASK), poutine.mask(guide, mask=MASK)
    elif case.startswith("poutine.scale"):
        scale = 0.3 if case == "poutine.scale" else torch.tensor([[0.5], [1.0], [2.0]])
        model, guide = poutine.scale(model, scale=scale), poutine.scale(guide, scale=scale)
    exact_kl = (weight * torch.distributions.kl_divergence(dist.Normal(q_loc, q_scale), dist.Normal(p, 1.0))).sum()
    return model, guide, exact_kl


@pytest.mark.parametrize(
    "case",
    [
        "Distribution.mask(False)",
        "Distribution.mask(tensor)",
        "poutine.mask (broadcast)",
        "poutine.scale",
        "poutine.scale (tensor)",
    ],
)
def test_masks_and_scales_weight_the_closed_form_kl_and_match_trace_elbo(case):
    model, guide, exact_kl = masked_programs(case)
    terms = TraceAnalyticKL_ELBO().terms(model, guide)
    assert terms.closed_form == ("z",)
    assert terms["z"] == pytest.approx(-exact_kl.item(), rel=1e-5, abs=1e-6)
    a = elbo_draws(TraceAnalyticKL_ELBO, model, guide, 40, particles=50, max_plate_nesting=2)
    t = elbo_draws(Trace_ELBO, model, guide, 40, particles=50, max_plate_nesting=2)
    assert_means_equal(a[:, None], t[:, None], 1)


def test_mask_on_one_side_only_falls_back_to_monte_carlo_and_matches_trace_elbo():
    """A masked guide against an unmasked prior has no registered KL: the term is
    log p - scale_and_mask(log q), as Trace_ELBO's."""
    x = torch.randn(4, generator=torch.Generator().manual_seed(13))

    def model():
        with pyro.plate("data", 4):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide():
        with pyro.plate("data", 4):
            pyro.sample("z", dist.Normal(0.5, 0.7).mask(MASK))

    assert TraceAnalyticKL_ELBO().terms(model, guide).closed_form == ()
    a = elbo_draws(TraceAnalyticKL_ELBO, model, guide, 40, particles=50)
    t = elbo_draws(Trace_ELBO, model, guide, 40, particles=50)
    assert_means_equal(a[:, None], t[:, None], 1)


# ---------------------------------------------------------------------------
# Training: the VAE default, per-term test figures, KL warm-up.


def test_vae_training_defaults_to_analytic_elbo_and_reports_recon_and_kl(tmp_path):
    from pyrovae.cli import main
    from pyrovae.train import TrainConfig

    assert TrainConfig().elbo == "analytic"
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "vae",
            "--data",
            "digits",
            "--train-size",
            "64",
            "--test-size",
            "32",
            "--epochs",
            "1",
            "--z-dim",
            "2",
            "--hidden",
            "8",
            "--test-particles",
            "2",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    header, row = (out / "metrics.csv").read_text().splitlines()[:2]
    metrics = dict(zip(header.split(","), map(float, row.split(","))))
    assert metrics["test_elbo"] == pytest.approx(metrics["test_recon"] - metrics["test_kl_top"], rel=1e-5)
    assert metrics["test_kl_top"] > 0 and metrics["test_recon"] < 0


def test_kl_warmup_raises_kl_scale_linearly_from_zero_to_one(monkeypatch, tmp_path):
    from pyrovae import train as training
    from pyrovae.recipes.vae import VAERecipe

    seen = []
    original = VAERecipe.on_epoch_start

    def record(self, cfg, epoch, objective):
        original(self, cfg, epoch, objective)
        seen.append(objective.kl_scale)

    monkeypatch.setattr(VAERecipe, "on_epoch_start", record)
    cfg = training.TrainConfig(
        data="digits",
        train_size=16,
        test_size=8,
        epochs=5,
        z_dim=2,
        hidden=[4],
        kl_warmup=3,
        test_particles=1,
        quiet=True,
        out=str(tmp_path),
    )
    training.train(cfg)
    assert seen == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])


def test_kl_warmup_needs_an_elbo_with_kl_scale():
    from pyrovae.cli import main

    with pytest.raises(SystemExit):
        main(["train", "vae", "--kl-warmup", "-1"])
    assert main(["train", "vae", "--elbo", "trace", "--kl-warmup", "2", "--epochs", "1", "--quiet"]) == 1
