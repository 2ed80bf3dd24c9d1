"""Variational diffusion models: the bound's closed forms, its estimators, the
schedules, and the literal T-step chain under stock Pyro ELBOs.

The reference case: a denoiser linear in z_t, eps_hat(z; gamma) = a(gamma) z
with a = sigma / 2, a function of the SNR only. For a fixed x and
z = alpha x + sigma eps its expected squared error is exact,

    m(gamma; x) = E_eps ||eps - a z||^2 = D (1 - a sigma)^2 + a^2 alpha^2 ||x||^2,

so  L_inf = 1/2 int_{gamma_min}^{gamma_max} m(g) dg  (gamma' dt = dg: the
invariance) and  L_T = 1/2 sum_i expm1(gamma_i - gamma_{i-1}) m(gamma_i),
both computed here without Monte Carlo.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from pyrovae.diffusion.denoisers import TimeMLP
from pyrovae.diffusion.gamma import GAMMA_MAX, GAMMA_MIN, SCHEDULES, LinearGamma, MonotoneNetGamma, make_gamma
from pyrovae.diffusion.vdm import VDM, BinPosterior, bin_centres
from pyrovae.infer.vdm_elbo import VDMELBO

D = 4
X = torch.tensor([[-1.0, -0.2, 0.6, 1.0]], dtype=torch.float64)  # one example, on bin centres
X = ((X + 1) * 127.5).round() / 127.5 - 1


class LinearDenoiser(nn.Module):
    """eps_hat(z; gamma) = sigma(gamma) z / 2, gamma read back from the VDM's tau."""

    def forward(self, z, tau):
        gamma = GAMMA_MIN + tau * ((GAMMA_MAX - GAMMA_MIN) / 1000.0)
        return 0.5 * torch.sigmoid(gamma).sqrt()[:, None] * z


def expected_error(gamma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """m(gamma; x) of the module docstring, float64."""
    sigma2, alpha2 = torch.sigmoid(gamma), torch.sigmoid(-gamma)
    a = 0.5 * sigma2.sqrt()
    return x.shape[-1] * (1 - a * sigma2.sqrt()) ** 2 + a**2 * alpha2 * x.square().sum()


def exact_L_inf(g0: float, g1: float, x: torch.Tensor) -> float:
    """1/2 int m dg by Simpson's rule on 20,000 intervals (error ~1e-12 here)."""
    g = torch.linspace(g0, g1, 20001, dtype=torch.float64)
    w = torch.ones_like(g)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return 0.5 * float((w * expected_error(g, x)).sum() * (g1 - g0) / (3 * 20000))


def exact_L_T(gamma: LinearGamma, T: int, x: torch.Tensor) -> float:
    with torch.no_grad():
        g = gamma(torch.arange(T + 1, dtype=torch.float64) / T)
    return 0.5 * float((torch.expm1(g[1:] - g[:-1]) * expected_error(g[1:], x)).sum())


def make_vdm(gamma=None, T=None, x_dim=D) -> VDM:
    return VDM(LinearDenoiser(), gamma if gamma is not None else LinearGamma(learn_ends=False), x_dim, T=T).double()


def replicate_mean_and_se(vdm: VDM, key: str, replicates: int = 20, draws: int = 500):
    """Mean and standard error over independent replicates of one example's term,
    each the mean of ``draws`` antithetic draws of t."""
    elbo = VDMELBO(num_particles=draws)
    with torch.no_grad():
        values = torch.stack([getattr(elbo.bound_terms(vdm, X), key)[0] for _ in range(replicates)])
    return values.mean().item(), values.std().item() / math.sqrt(replicates)


def wiggly_net_gamma(g0=GAMMA_MIN, g1=GAMMA_MAX) -> MonotoneNetGamma:
    """A monotone-network schedule far from linear, with end points g0, g1."""
    torch.manual_seed(3)
    gamma = MonotoneNetGamma(g0, g1, features=16).double()
    with torch.no_grad():
        gamma.l1.weight.fill_(0.1)
        gamma.l2.weight.mul_(20)
        gamma.l3.weight.mul_(200)
    return gamma


# --- L_T -> L_inf ---------------------------------------------------------------------


def test_discrete_bound_tends_to_continuous_at_rate_one_over_T():
    gamma = LinearGamma(learn_ends=False).double()
    L_inf = exact_L_inf(GAMMA_MIN, GAMMA_MAX, X)
    gaps = {T: T * (exact_L_T(gamma, T, X) - L_inf) for T in (10, 100, 1000, 10000)}
    # T (L_T - L_inf) levels off at a nonzero constant: L_T - L_inf = c / T + o(1/T)
    assert abs(gaps[1000] - gaps[10000]) < 0.01 * abs(gaps[10000])
    assert abs(gaps[100] - gaps[1000]) > abs(gaps[1000] - gaps[10000])
    assert abs(gaps[10000]) > 0.1
    assert abs(exact_L_T(gamma, 10000, X) - L_inf) < 1e-3 * L_inf


@pytest.mark.parametrize("T", [None, 8])
def test_monte_carlo_diffusion_term_matches_exact_value(T):
    pyro.set_rng_seed(0)
    vdm = make_vdm(T=T)
    exact = exact_L_inf(GAMMA_MIN, GAMMA_MAX, X) if T is None else exact_L_T(vdm.gamma, T, X)
    mean, se = replicate_mean_and_se(vdm, "kl_layers")
    assert abs(mean - exact) < 4 * se
    assert se < 0.02 * exact  # a test that can fail: the tolerance is tight against the value


def test_antithetic_times_lower_the_variance_and_keep_the_mean():
    # D = 256, so that the spread over t, which antithetic draws reduce, dominates that over eps
    pyro.set_rng_seed(1)
    x = X.repeat(1, 64)
    vdm = make_vdm(x_dim=x.shape[1])
    exact = exact_L_inf(GAMMA_MIN, GAMMA_MAX, x)
    spreads = {}
    for antithetic in (True, False):
        elbo = VDMELBO(num_particles=64, antithetic=antithetic)
        with torch.no_grad():
            values = torch.stack([elbo.bound_terms(vdm, x).kl_layers[0] for _ in range(100)])
        assert abs(values.mean().item() - exact) < 4 * values.std().item() / math.sqrt(100)
        spreads[antithetic] = values.std().item()
    assert spreads[True] < 0.5 * spreads[False]


# --- invariance to the schedule's interior ----------------------------------------------


def test_continuous_bound_depends_only_on_schedule_end_points():
    pyro.set_rng_seed(2)
    exact = exact_L_inf(GAMMA_MIN, GAMMA_MAX, X)
    linear_mean, linear_se = replicate_mean_and_se(make_vdm(LinearGamma(learn_ends=False)), "kl_layers")
    net_mean, net_se = replicate_mean_and_se(make_vdm(wiggly_net_gamma()), "kl_layers")
    other_mean, other_se = replicate_mean_and_se(make_vdm(wiggly_net_gamma(-9.0, GAMMA_MAX)), "kl_layers")
    assert abs(linear_mean - exact) < 4 * linear_se
    assert abs(net_mean - exact) < 4 * net_se
    assert abs(net_mean - linear_mean) < 4 * math.hypot(net_se, linear_se)
    assert abs(other_mean - exact) > 10 * other_se  # other end points, other bound
    assert abs(other_mean - exact_L_inf(-9.0, GAMMA_MAX, X)) < 4 * other_se


def test_wiggly_schedule_is_far_from_linear():
    # the invariance test above is only a test if the interior differs
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    with torch.no_grad():
        diff = (wiggly_net_gamma()(t) - LinearGamma(learn_ends=False).double()(t)).abs().max()
    assert diff > 2.0


def test_variance_minimisation_keeps_the_bound_and_lowers_its_variance():
    # from a schedule whose interior is far from the best (high variance), at
    # D = 256 so that the spread over t, which the interior controls, dominates
    pyro.set_rng_seed(4)
    x = X.repeat(1, 64)
    gamma = wiggly_net_gamma()
    vdm = make_vdm(gamma, x_dim=x.shape[1])
    exact = exact_L_inf(GAMMA_MIN, GAMMA_MAX, x)
    elbo = VDMELBO(num_particles=64, antithetic=False, minimise_variance=True)
    optim = torch.optim.Adam(gamma.interior_parameters(), lr=0.05)

    def draws():
        with torch.no_grad():
            return torch.cat([elbo.estimate(vdm, x)[1][:, 0] for _ in range(20)])

    before = draws()
    for _ in range(60):
        optim.zero_grad()
        elbo.loss_and_grads(vdm.model, vdm.guide, x)
        optim.step()
    after = draws()
    assert gamma.gamma_min.item() == pytest.approx(GAMMA_MIN) and gamma.gamma_max.item() == pytest.approx(GAMMA_MAX)
    for values in (before, after):  # the same bound before and after
        assert abs(values.mean().item() - exact) < 4 * values.std().item() / math.sqrt(len(values))
    assert after.std() < 0.7 * before.std()


def test_variance_minimisation_changes_only_the_interior_gradient():
    gamma = wiggly_net_gamma()
    vdm = VDM(TimeMLP(D, [8]), gamma, D).double()
    grads = {}
    for option in (False, True):
        vdm.zero_grad()
        pyro.set_rng_seed(8)
        loss = VDMELBO(num_particles=3, minimise_variance=option).differentiable_loss(vdm.model, vdm.guide, X)
        loss.backward()
        grads[option] = (loss.item(), {n: p.grad.clone() for n, p in vdm.named_parameters()})
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-12)  # the same -ELBO
    interior = {n for n, p in vdm.named_parameters() if any(p is q for q in gamma.interior_parameters())}
    for name, g in grads[False][1].items():
        same = torch.allclose(grads[True][1][name], g, rtol=1e-9, atol=1e-12)
        assert same != (name in interior and g.abs().sum() > 0), name


def test_variance_minimisation_needs_continuous_time():
    vdm = make_vdm(MonotoneNetGamma(features=4).double(), T=4)
    with pytest.raises(ValueError, match="continuous-time"):
        VDMELBO(minimise_variance=True).loss_and_grads(vdm.model, vdm.guide, X)


# --- the literal chain ------------------------------------------------------------------


def exact_recon(vdm: VDM, x: torch.Tensor) -> float:
    """E_{z_0 ~ q(z_0|x)}[-log p(x|z_0)] by a quadrature over eps per pixel."""
    with torch.no_grad():
        g0 = vdm.gamma(torch.zeros((), dtype=torch.float64))
    eps = torch.linspace(-9, 9, 8001, dtype=torch.float64)
    w = torch.exp(-0.5 * eps**2) * (eps[1] - eps[0]) / math.sqrt(2 * math.pi)
    u = x[0, :, None] + (0.5 * g0).exp() * eps  # z_0 / alpha_0 = x + exp(gamma_0 / 2) eps
    logits = -0.5 * ((u[..., None] - bin_centres(torch.float64)) / (0.5 * g0).exp()) ** 2
    log_p = -0.5 * ((u - x[0, :, None]) / (0.5 * g0).exp()) ** 2 - logits.logsumexp(-1)
    return float(-(w * log_p).sum())


def exact_prior_kl(vdm: VDM, x: torch.Tensor) -> float:
    with torch.no_grad():
        g1 = vdm.gamma(torch.ones((), dtype=torch.float64))
    var = torch.sigmoid(g1)
    return float(0.5 * (var + (1 - var) * x.square() - 1 - var.log()).sum())


def test_literal_four_step_chain_under_trace_elbo_matches_closed_form():
    pyro.set_rng_seed(5)
    vdm = make_vdm(LinearGamma(-6.0, 3.0, learn_ends=False).double(), T=4)
    exact = exact_L_T(vdm.gamma, 4, X) + exact_prior_kl(vdm, X) + exact_recon(vdm, X)
    copies = X.expand(2000, D)
    values = torch.tensor([Trace_ELBO().loss(vdm.model, vdm.guide, copies) / len(copies) for _ in range(10)])
    mean, se = values.mean().item(), values.std().item() / math.sqrt(len(values))
    assert abs(mean - exact) < 4 * se
    assert se < 0.02 * exact
    # and VDMELBO's T-step estimator (closed-form KLs, one draw of t) agrees too
    est = torch.tensor([VDMELBO(num_particles=2000).loss(vdm.model, vdm.guide, X) for _ in range(10)])
    assert abs(est.mean().item() - exact) < 4 * est.std().item() / math.sqrt(len(est))


def test_literal_chain_sites_are_named_by_step():
    vdm = make_vdm(T=3)
    trace = pyro.poutine.trace(vdm.model).get_trace(X)
    assert [n for n in trace.stochastic_nodes if n != "data"] == ["z_3", "z_2", "z_1", "z_0"]  # "data": the plate
    assert trace.observation_nodes == ["x"]


def test_continuous_model_has_no_literal_chain():
    vdm = make_vdm()
    with pytest.raises(ValueError, match="continuous-time"):
        vdm.model(X)


@pytest.mark.parametrize("scale", [1e-3, 0.05, 3.0])
def test_decoder_is_a_distribution_over_the_bins(scale):
    loc = torch.tensor([-1.3, -0.5, 0.0, 0.2, 1.4], dtype=torch.float64)
    d = BinPosterior(loc, torch.full_like(loc, scale))
    logp = torch.stack([d.log_prob(torch.full_like(loc, v)) for v in bin_centres(torch.float64)])
    assert torch.allclose(logp.exp().sum(0), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(logp.T, d.logits(), atol=1e-10)  # the windowed normaliser is the full one
    draws = d.sample((100,))
    assert torch.equal(((draws + 1) * 127.5).round() / 127.5 - 1, draws)


# --- the schedules ----------------------------------------------------------------------


def check_monotone(gamma) -> None:
    t = torch.linspace(0, 1, 513)
    with torch.no_grad():
        g, dg = gamma.gamma_and_derivative(t)
    assert (g[1:] - g[:-1] >= 0).all()
    assert (dg >= 0).all()
    assert g[0].item() == pytest.approx(gamma.gamma_min.item(), abs=1e-4)
    assert g[-1].item() == pytest.approx(gamma.gamma_max.item(), abs=1e-4)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_gamma_is_monotone_before_and_after_training(name):
    pyro.set_rng_seed(6)
    pyro.clear_param_store()
    gamma = make_gamma(name)
    check_monotone(gamma)
    vdm = VDM(TimeMLP(D, [16]), gamma, D)
    x = torch.rand(32, D) * 2 - 1
    x = ((x + 1) * 127.5).round() / 127.5 - 1
    svi = pyro.infer.SVI(
        vdm.model, vdm.guide, pyro.optim.Adam({"lr": 0.1}), VDMELBO(minimise_variance=name == "learned-net")
    )
    start = {k: v.clone() for k, v in gamma.state_dict().items()}
    for _ in range(10):
        svi.step(x)
    if name != "fixed":
        assert any(not torch.equal(start[k], v) for k, v in gamma.state_dict().items())
    check_monotone(gamma)


@pytest.mark.parametrize("gamma", [LinearGamma(-3.0, 2.0), wiggly_net_gamma(-3.0, 2.0)])
def test_gamma_derivative_is_the_derivative(gamma):
    gamma = gamma.double()
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        _, dg = gamma.gamma_and_derivative(t)
        fd = (gamma(t + h) - gamma(t - h)) / (2 * h)
    assert torch.allclose(dg, fd, rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="gamma_max"):
        LinearGamma(1.0, 1.0)
    with pytest.raises(ValueError, match="unknown gamma schedule"):
        make_gamma("cosine")
    with pytest.raises(TypeError, match="GammaSchedule"):
        VDM(LinearDenoiser(), object(), D)
    with pytest.raises(ValueError, match="T must be"):
        VDM(LinearDenoiser(), LinearGamma(), D, T=0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        make_vdm(T=2).model(X * 2)
    with pytest.raises(TypeError, match="vdm.model"):
        vdm = make_vdm()
        VDMELBO().loss(vdm.guide, vdm.guide, X)


def test_samples_are_images_on_the_bins_for_any_number_of_steps():
    pyro.set_rng_seed(7)
    vdm = make_vdm()
    for steps in (1, 7):
        x = vdm.sample(5, steps=steps)
        assert x.shape == (5, D)
        assert torch.equal(((x + 1) * 127.5).round() / 127.5 - 1, x)


# --- the command line -------------------------------------------------------------------

TINY = [
    "--data",
    "digits",
    "--train-size",
    "64",
    "--test-size",
    "16",
    "--epochs",
    "1",
    "--channels",
    "4",
    "--sample-steps",
    "3",
    "--quiet",
]


def test_train_sample_evaluate_round_trip(tmp_path, capsys):
    import json

    from pyrovae.cli import main

    run = str(tmp_path / "run")
    assert main(["train", "vdm", *TINY, "--schedule", "learned-net", "--minimise-variance", "--out", run]) == 0
    assert (tmp_path / "run" / "samples.png").exists() and (tmp_path / "run" / "schedule.png").exists()
    assert main(["sample", "vdm", run, "--steps", "4", "--n", "4"]) == 0
    assert (tmp_path / "run" / "samples-0.png").exists() and (tmp_path / "run" / "samples-0.npy").exists()
    capsys.readouterr()
    assert main(["evaluate", "vdm", run, "--n", "8", "--replicates", "3", "--draws", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_bpd_se"] > 0 and result["replicates"] == 3
    assert result["test_elbo"] == pytest.approx(
        result["test_recon"] - result["test_kl_top"] - result["test_kl_layers"], rel=1e-5
    )
    assert result["test_bpd"] == pytest.approx(-result["test_elbo"] / (64 * math.log(2)), rel=1e-5)
    assert not {"bits_per_dim", "nats", "recon_nats"} & set(
        result
    )  # one vocabulary: the names evaluate vae|hvae|diffusion print


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--data", "moons"], "8-bit images"),
        (["--minimise-variance"], "learned-net"),
        (["--time", "8", "--schedule", "learned-net", "--minimise-variance"], "continuous time"),
    ],
)
def test_bad_vdm_settings_are_named(flags, message, tmp_path, capsys):
    from pyrovae.cli import main

    assert main(["train", "vdm", *TINY, *flags, "--out", str(tmp_path)]) == 1
    assert message in capsys.readouterr().err


def test_a_bad_time_is_a_usage_error(capsys):
    from pyrovae.cli import main

    with pytest.raises(SystemExit) as exc:  # a flag's value: exit 2 with the usage line (issue 24)
        main(["train", "vdm", *TINY, "--time", "soon"])
    assert exc.value.code == 2 and "argument --time: time must be" in capsys.readouterr().err
