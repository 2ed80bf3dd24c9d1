"""TraceAnalyticKL_ELBO with guide sites enumerated in parallel: exact sums
over y, closed-form KLs inside each branch.

Monte Carlo comparisons use the standard error computed from the draws, with a
Bonferroni correction over the comparisons one test makes (the helpers of
tests/test_analytic_elbo.py): each fails with probability at most 1e-3 when the
estimator is right, and the seeds are fixed.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate
from test_analytic_elbo import assert_means_equal, z_critical

from pyrovae.compiled import CompiledLoss
from pyrovae.infer import TraceAnalyticKL_ELBO
from pyrovae.ssvae import SSVAE
from pyrovae.train import LossModule


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield


# ---------------------------------------------------------------------------
# A discrete-Gaussian model with closed forms: y_n ~ Cat(pi), z_n | y_n ~ N(m_y, 1),
# and x_n | y_n ~ N(c_y, s^2) (every term closed form) or x_n | z_n ~ N(z_n, s^2).


class DiscreteGaussian:
    """Model y_n ~ Cat(pi), z_n | y_n ~ N(m_y, 1), x_n ~ N(c_y, s^2) or N(z_n, s^2);
    guide q(y_n) = Cat(softmax(l_n)), q(z_n | y_n) = N(a_n + b_y, v_y^2), y enumerated."""

    N, K, s = 6, 3, 0.7

    def __init__(self, x_on_z: bool = False, subsample_size=None):
        g = torch.Generator().manual_seed(21)
        self.pi_logits = torch.randn(self.K, generator=g, dtype=torch.float64)
        self.m = torch.tensor([-1.5, 0.0, 2.0], dtype=torch.float64)
        self.c = torch.tensor([-1.0, 0.5, 1.5], dtype=torch.float64)
        self.x = 1.5 * torch.randn(self.N, generator=g, dtype=torch.float64)
        self.logits = torch.randn(self.N, self.K, generator=g, dtype=torch.float64).requires_grad_()
        self.a = torch.randn(self.N, generator=g, dtype=torch.float64).requires_grad_()
        self.b = torch.tensor([-1.0, 0.2, 1.0], dtype=torch.float64, requires_grad=True)
        self.v = torch.tensor([0.5, 0.8, 1.2], dtype=torch.float64, requires_grad=True)
        self.params = [self.logits, self.a, self.b, self.v]
        self.x_on_z, self.subsample_size = x_on_z, subsample_size

    def model(self):
        with pyro.plate("data", self.N, subsample_size=self.subsample_size) as idx:
            y = pyro.sample("y", dist.Categorical(logits=self.pi_logits))
            z = pyro.sample("z", dist.Normal(self.m[y], 1.0))
            pyro.sample("x", dist.Normal(z if self.x_on_z else self.c[y], self.s), obs=self.x[idx])

    @config_enumerate
    def guide(self):
        with pyro.plate("data", self.N, subsample_size=self.subsample_size) as idx:
            y = pyro.sample("y", dist.Categorical(logits=self.logits[idx]))
            pyro.sample("z", dist.Normal(self.a[idx] + self.b[y], self.v[y]))

    def elbo_per_point(self) -> torch.Tensor:
        """sum_y q(y) [E_q log p(x|.) - KL(q(z|y) || p(z|y)) + log p(y) - log q(y)], shape (N,), with
        E_q log N(x; z, s^2) = log N(x; mu, s^2) - v^2 / (2 s^2) for z ~ N(mu, v^2)."""
        q = self.logits.softmax(-1)
        mu, v = self.a[:, None] + self.b, self.v.expand(self.N, self.K)
        if self.x_on_z:
            loglik = dist.Normal(mu, self.s).log_prob(self.x[:, None]) - v**2 / (2 * self.s**2)
        else:
            loglik = dist.Normal(self.c, self.s).log_prob(self.x[:, None])
        kl_z = torch.distributions.kl_divergence(dist.Normal(mu, v), dist.Normal(self.m, 1.0))
        log_py, log_q = self.pi_logits.log_softmax(-1), self.logits.log_softmax(-1)
        return (q * (loglik - kl_z + log_py - log_q)).sum(-1)


@pytest.mark.parametrize(
    "particles",
    [{}, {"num_particles": 3}, {"num_particles": 3, "vectorize_particles": True}],
    ids=["one particle", "sequential particles", "vectorised particles"],
)
def test_every_term_closed_form_gives_the_exact_elbo_with_no_sampling_noise(particles):
    m = DiscreteGaussian()
    exact = m.elbo_per_point().sum()
    elbo = TraceAnalyticKL_ELBO(**particles)
    losses = [elbo.differentiable_loss(m.model, m.guide) for _ in range(3)]
    terms = elbo.terms(m.model, m.guide)
    assert terms.closed_form == ("z",) and terms.enumerated == ("y",)
    for loss in losses:
        assert -loss.item() == pytest.approx(exact.item(), rel=1e-12)
    assert sum(terms.values()) == pytest.approx(exact.item(), rel=1e-12)
    # the gradient too is exact: that of the closed form
    for got, want in zip(torch.autograd.grad(losses[0], m.params), torch.autograd.grad(-exact, m.params)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_kl_scale_weights_the_latent_terms_of_the_enumerated_sum():
    m = DiscreteGaussian()
    terms = TraceAnalyticKL_ELBO().terms(m.model, m.guide)
    loss = TraceAnalyticKL_ELBO(kl_scale=0.25).loss(m.model, m.guide)
    assert -loss == pytest.approx(terms["x"] + 0.25 * (terms["y"] + terms["z"]), rel=1e-12)


def test_x_depending_on_z_equals_the_closed_form_elbo_within_its_monte_carlo_error():
    m = DiscreteGaussian(x_on_z=True)
    exact = m.elbo_per_point().sum().detach()
    elbo = TraceAnalyticKL_ELBO(num_particles=20, vectorize_particles=True, max_plate_nesting=1)
    draws = torch.tensor([-elbo.loss(m.model, m.guide) for _ in range(60)], dtype=torch.float64)
    assert draws.std() > 0  # x's term is still sampled, in each branch
    assert_means_equal(draws[:, None], exact, 1)


def test_subsampled_plate_scales_the_enumerated_sum_by_n_over_b_and_is_unbiased():
    m = DiscreteGaussian(subsample_size=2)
    per_point = m.elbo_per_point().detach()

    def model_on(idx):
        def model():
            with pyro.plate("data", m.N, subsample=idx):
                y = pyro.sample("y", dist.Categorical(logits=m.pi_logits))
                pyro.sample("z", dist.Normal(m.m[y], 1.0))
                pyro.sample("x", dist.Normal(m.c[y], m.s), obs=m.x[idx])

        @config_enumerate
        def guide():
            with pyro.plate("data", m.N, subsample=idx):
                y = pyro.sample("y", dist.Categorical(logits=m.logits[idx]))
                pyro.sample("z", dist.Normal(m.a[idx] + m.b[y], m.v[y]))

        return model, guide

    idx = torch.tensor([1, 4])
    loss = TraceAnalyticKL_ELBO().loss(*model_on(idx))
    assert -loss == pytest.approx((m.N / 2) * per_point[idx].sum().item(), rel=1e-12)
    # a random subsample per draw: the mean of N/B times B points' sums is the full ELBO
    elbo = TraceAnalyticKL_ELBO(num_particles=50, vectorize_particles=True, max_plate_nesting=1)
    draws = torch.tensor([-elbo.loss(m.model, m.guide) for _ in range(40)], dtype=torch.float64)
    assert_means_equal(draws[:, None], per_point.sum(), 1)


MASK = torch.tensor([True, False, True, True, False, True])


@pytest.mark.parametrize("case", ["poutine.scale", "poutine.mask", "scale and mask"])
def test_scale_and_mask_weight_each_points_enumerated_sum(case):
    m = DiscreteGaussian()
    per_point = m.elbo_per_point().detach()
    weight = torch.ones(m.N, dtype=torch.float64)
    model, guide = m.model, m.guide
    if "mask" in case:
        model, guide = poutine.mask(model, mask=MASK), poutine.mask(guide, mask=MASK)
        weight = weight * MASK
    if "scale" in case:
        model, guide = poutine.scale(model, scale=0.3), poutine.scale(guide, scale=0.3)
        weight = weight * 0.3
    terms = TraceAnalyticKL_ELBO().terms(model, guide)
    assert sum(terms.values()) == pytest.approx((weight * per_point).sum().item(), rel=1e-12)


# ---------------------------------------------------------------------------
# The dependency rule inside the branches.


def chain_model():
    """y ~ Cat(1/3, 1/3, 1/3), z1 | y ~ N(m_y, 1), z2 | z1 ~ N(z1, 1), x | z2 ~ N(z2, 0.5^2)."""
    y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))
    z1 = pyro.sample("z1", dist.Normal(torch.tensor([-1.0, 0.0, 1.5])[y], 1.0))
    z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
    pyro.sample("x", dist.Normal(z2, 0.5), obs=torch.tensor(0.8))


@config_enumerate
def out_of_order_guide():
    """z2 before z1 and z1 from z2: z2's closed-form KL would be biased."""
    y = pyro.sample("y", dist.Categorical(logits=torch.tensor([0.3, -0.2, 0.5])))
    z2 = pyro.sample("z2", dist.Normal(torch.tensor([-0.5, 0.3, 1.0])[y], 0.8))
    pyro.sample("z1", dist.Normal(0.5 * z2, 0.6))


def test_dependency_rule_failing_in_a_branch_takes_monte_carlo_there_and_stays_unbiased():
    elbo = TraceAnalyticKL_ELBO(num_particles=100, vectorize_particles=True, max_plate_nesting=0)
    with pytest.warns(UserWarning, match=r"biased at sites \['z2'\]"):
        terms = elbo.terms(chain_model, out_of_order_guide)
    assert terms.closed_form == ("z1",) and terms.enumerated == ("y",)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ours = torch.tensor([-elbo.loss(chain_model, out_of_order_guide) for _ in range(60)], dtype=torch.float64)
    enum = TraceEnum_ELBO(num_particles=100, vectorize_particles=True, max_plate_nesting=0)
    theirs = torch.tensor([-enum.loss(chain_model, out_of_order_guide) for _ in range(60)], dtype=torch.float64)
    assert_means_equal(ours[:, None], theirs[:, None], 1)


# ---------------------------------------------------------------------------
# What it cannot sum exactly raises, naming the site and TraceEnum_ELBO.


def plain_model():
    with pyro.plate("data", 4):
        y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))
        pyro.sample("x", dist.Normal(y.float(), 1.0), obs=torch.zeros(4))


def guide_with(infer):
    def guide():
        with pyro.plate("data", 4):
            pyro.sample("y", dist.Categorical(logits=torch.zeros(3)), infer=infer)

    return guide


@pytest.mark.parametrize(
    "infer, message",
    [
        ({"enumerate": "sequential"}, "site 'y' asks for 'sequential'"),
        ({"enumerate": "parallel", "num_samples": 5}, "site 'y' asks for num_samples=5"),
    ],
)
def test_sequential_and_multi_sample_enumeration_raise(infer, message):
    with pytest.raises(ValueError, match=f"{message}.*TraceEnum_ELBO"):
        TraceAnalyticKL_ELBO(max_plate_nesting=1).loss(plain_model, guide_with(infer))


def test_enumeration_in_the_model_only_raises():
    model = config_enumerate(plain_model)

    def guide():
        pass

    with pytest.raises(ValueError, match="site 'y' is marked for enumeration in the model.*TraceEnum_ELBO"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pyro's "vars in model but not guide"
            TraceAnalyticKL_ELBO(max_plate_nesting=1).loss(model, guide)


def test_a_site_outside_the_plate_depending_on_an_enumerated_site_inside_raises():
    def model():
        with pyro.plate("data", 4):
            y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))
        # the sum over the plate keeps y's enumeration dimension: g's term has it, not the plate
        pyro.sample("g", dist.Normal(y.float().sum(-1, keepdim=True), 1.0), obs=torch.zeros(1))

    with pytest.raises(ValueError, match=r"site 'g' lies outside the plate\(s\) \['data'\].*TraceEnum_ELBO"):
        TraceAnalyticKL_ELBO(max_plate_nesting=1).loss(model, guide_with({"enumerate": "parallel"}))


def test_a_score_function_site_below_an_enumerated_site_raises():
    def model():
        y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)))
        pyro.sample("k", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(y.float(), 1.0), obs=torch.tensor(0.0))

    def guide():
        y = pyro.sample("y", dist.Categorical(logits=torch.zeros(3)), infer={"enumerate": "parallel"})
        pyro.sample("k", dist.Bernoulli(torch.tensor([0.2, 0.5, 0.7])[y]))

    with pytest.raises(ValueError, match="site 'k' is sampled in each branch.*TraceEnum_ELBO"):
        TraceAnalyticKL_ELBO(max_plate_nesting=0).loss(model, guide)


def test_without_max_plate_nesting_it_is_guessed_once():
    m = DiscreteGaussian()
    elbo = TraceAnalyticKL_ELBO()
    exact = m.elbo_per_point().sum().item()
    assert -elbo.loss(m.model, m.guide) == pytest.approx(exact, rel=1e-12)
    assert elbo.max_plate_nesting == 1


# ---------------------------------------------------------------------------
# The semi-supervised VAE (M2) at fixed random weights.


def small_m2():
    torch.manual_seed(3)
    m2 = SSVAE(12, 3, z_dim=2, hidden=(8,))
    x = torch.bernoulli(torch.full((5, 12), 0.4), generator=torch.Generator().manual_seed(4))
    return m2, x


def m2_draws(elbo, m2, x, n: int) -> tuple:
    """n independent (loss, flat gradient) estimates."""
    params = list(m2.parameters())
    losses, grads = [], []
    for _ in range(n):
        loss = elbo.differentiable_loss(m2.model, m2.guide, x)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        losses.append(loss.detach())
    return torch.stack(losses).double(), torch.stack(grads).double()


@pytest.fixture(scope="module")
def m2_single_draws():
    """One-particle loss and gradient draws of both estimators on M2 (shared by two tests)."""
    pyro.set_rng_seed(5)
    m2, x = small_m2()
    with pyro.validation_enabled(True):
        return {
            name: m2_draws(elbo(max_plate_nesting=1), m2, x, 300)
            for name, elbo in (("analytic", TraceAnalyticKL_ELBO), ("enum", TraceEnum_ELBO))
        }


def test_m2_loss_and_gradient_projections_match_trace_enum_elbo_in_expectation(m2_single_draws):
    (loss_a, grad_a), (loss_t, grad_t) = m2_single_draws["analytic"], m2_single_draws["enum"]
    directions = torch.randn(grad_a.shape[1], 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    a = torch.cat([loss_a[:, None], grad_a @ directions], 1)
    t = torch.cat([loss_t[:, None], grad_t @ directions], 1)
    assert_means_equal(a, t, comparisons=5)


def test_m2_gradient_variance_is_at_most_trace_enum_elbos(m2_single_draws):
    """Total gradient variance sum_j Var[g_j] at a fixed point, one particle:
    both sum y exactly and sample x's term; TraceEnum_ELBO samples the KL of z
    too. Asserted: ours + z * its standard error <= TraceEnum_ELBO's (the
    margin is the two-sided 1e-3 critical value times the standard error of
    our estimate; measured ratio printed)."""

    def total_variance(grads):
        sq = ((grads - grads.mean(0)) ** 2).sum(1)
        return sq.mean(), sq.std() / math.sqrt(len(sq))

    (var_a, se_a), (var_t, _) = (total_variance(m2_single_draws[k][1]) for k in ("analytic", "enum"))
    print(f"M2 gradient variance ratio analytic / TraceEnum_ELBO: {var_a / var_t:.3f}")
    assert var_a + z_critical(1) * se_a <= var_t


def test_m2_labelled_pair_sums_nothing_and_takes_log_p_y():
    m2, x = small_m2()
    y = torch.tensor([0, 2, 1, 1, 0])
    terms = TraceAnalyticKL_ELBO().terms(m2.model, m2.guide, x, y)
    assert terms.enumerated == () and terms.closed_form == ("z",)
    assert terms["y"] == pytest.approx(5 * math.log(1 / 3), rel=1e-6)


def test_m2_per_example_terms_sum_to_the_terms_of_the_same_draws():
    m2, x = small_m2()
    elbo = TraceAnalyticKL_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(8)
    per_example, closed_form = elbo.per_example_terms(m2.model, m2.guide, x)
    pyro.set_rng_seed(8)
    terms = elbo.terms(m2.model, m2.guide, x)
    assert closed_form == terms.closed_form == ("z",)
    assert {k: v.shape for k, v in per_example.items()} == {k: (5,) for k in ("x", "y", "z")}
    assert {k: v.sum().item() for k, v in per_example.items()} == pytest.approx(dict(terms), rel=1e-5)


def test_m2_loss_is_captured_into_a_graph_and_replays_the_eager_loss_bit_for_bit():
    m2, x = small_m2()
    eager = LossModule(m2, TraceAnalyticKL_ELBO(max_plate_nesting=1))
    captured = CompiledLoss(eager, backend=None)
    captured(x)
    assert captured.failed is None and captured.graphs == 1
    results = []
    for fn in (eager, captured):
        torch.manual_seed(7)
        loss = fn(x)
        results.append((loss.detach(), torch.autograd.grad(loss, list(m2.parameters()))))
    (want, want_grads), (got, got_grads) = results
    assert torch.equal(want, got)
    for a, b in zip(want_grads, got_grads):
        assert torch.equal(a, b)


def test_toy_three_class_variances_against_trace_enum_elbo():
    """The issue's 3-class toy (y ~ Cat, z | y Gaussian, x | z Gaussian; six
    points), one particle: the variance of the loss and the total variance of
    the gradient, each relative to TraceEnum_ELBO's, for the enumerated
    analytic ELBO and for the same estimator with y sampled (the marker
    removed: what it did before enumeration); the ratios are printed.

    Asserted, each with the two-sided 1e-3 critical value times the standard
    errors as margin: the gradient variance is at most TraceEnum_ELBO's, and
    summing y lowers both variances below those of sampling it. The loss's
    variance is not asserted against TraceEnum_ELBO's: the closed-form KL
    drops the Monte Carlo log p(z) - log q(z), which partly cancels the noise
    of log p(x|z), and here the loss is noisier for it (the gradient is not)."""
    m = DiscreteGaussian(x_on_z=True)
    sampled_guide = poutine.infer_config(m.guide, lambda site: {"enumerate": None})

    def variances(elbo, guide, n=400):
        """[(variance, its standard error)] of the loss and of the gradient (summed over coordinates)."""
        losses, grads = [], []
        for _ in range(n):
            loss = elbo.differentiable_loss(m.model, guide)
            grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, m.params)]))
            losses.append(loss.detach())
        losses, grads = torch.stack(losses), torch.stack(grads)
        loss_sq, grad_sq = (losses - losses.mean()) ** 2, ((grads - grads.mean(0)) ** 2).sum(1)
        return [(sq.mean(), sq.std() / math.sqrt(n)) for sq in (loss_sq, grad_sq)]

    ours = variances(TraceAnalyticKL_ELBO(max_plate_nesting=1), m.guide)
    enum = variances(TraceEnum_ELBO(max_plate_nesting=1), m.guide)
    sampled = variances(TraceAnalyticKL_ELBO(max_plate_nesting=1), sampled_guide)
    for what, i in (("loss", 0), ("gradient", 1)):
        print(
            f"toy {what} variance relative to TraceEnum_ELBO: enumerated analytic {ours[i][0] / enum[i][0]:.3f}, "
            f"analytic with y sampled {sampled[i][0] / enum[i][0]:.3f}"
        )
    z = z_critical(3)
    assert ours[1][0] + z * ours[1][1] <= enum[1][0] - z * enum[1][1]
    for i in (0, 1):
        assert ours[i][0] + z * ours[i][1] < sampled[i][0] - z * sampled[i][1]
