"""The probability-flow ODE likelihood on Gaussian data, where the model's
log-density at every t is known in closed form (tests/gaussian_diffusion.py)."""

import math

import pytest
import torch
from gaussian_diffusion import MU, SIGMA, ExactChainNet, ExactVDMNet, GaussianVP, exact_eps, log_density

from pyrovae.diffusion import VDM, DiffusionChain, LinearGamma, NoiseSchedule
from pyrovae.diffusion.ode import BIN_WIDTH, divergence, ode_log_likelihood
from pyrovae.diffusion.samplers import alpha_sigma, diffusion_view

ZERO = torch.zeros(2, dtype=torch.float64)


def gaussian_data(n: int, seed: int = 0) -> torch.Tensor:
    return MU + torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) @ SIGMA.sqrt()


def closed_form(model, x: torch.Tensor, mu=MU) -> torch.Tensor:
    """log p(x) of x = x_{t_min} / alpha_{t_min}: log N(alpha x; alpha mu, Cov_{t_min}) + D log alpha."""
    view = diffusion_view(model)
    alpha, sigma = alpha_sigma(view, view.time_range[0])
    return log_density(alpha * x, alpha, sigma, mu=mu) + x.shape[1] * math.log(alpha)


def test_ode_log_density_equals_the_closed_form_gaussian_density():
    # gamma_max = 20: alpha_1 = 5e-5, so the prior N(0, I) is q(x_1) to ~1e-4 nats
    model, x = GaussianVP(gamma_max=20.0), gaussian_data(20)
    result = ode_log_likelihood(model, x, exact_divergence=True, dequantise=False)
    # rtol = atol = 1e-5 leave ~1e-4 nats here
    torch.testing.assert_close(result["log_likelihood"], closed_form(model, x), rtol=0, atol=1e-3)
    assert result["nfe"] == model.calls > 0


def test_ode_on_the_chain_uses_its_continuous_limit():
    # zero-mean data and T = 20 linear steps (alpha_bar_T ~ 6e-11): the prior is q(x_T) to ~1e-9 nats
    schedule = NoiseSchedule.from_name("linear", 20)
    chain = DiffusionChain(ExactChainNet(schedule.alphas_cumprod, ZERO), schedule, x_dim=2).double()
    x = gaussian_data(10)
    result = ode_log_likelihood(chain, x, exact_divergence=True, dequantise=False, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(result["log_likelihood"], closed_form(chain, x, ZERO), rtol=0, atol=1e-4)


def test_ode_on_vdm_uses_its_gamma():
    vdm = VDM(ExactVDMNet(ZERO), LinearGamma(gamma_min=-10.0, gamma_max=20.0, learn_ends=False), x_dim=2).double()
    x = gaussian_data(10)
    result = ode_log_likelihood(vdm, x, exact_divergence=True, dequantise=False)
    torch.testing.assert_close(result["log_likelihood"], closed_form(vdm, x, ZERO), rtol=0, atol=1e-3)


def test_bits_per_dim_is_the_negative_log_likelihood_in_bits_per_dimension():
    result = ode_log_likelihood(GaussianVP(gamma_max=20.0), gaussian_data(5), exact_divergence=True, dequantise=False)
    torch.testing.assert_close(result["bits_per_dim"], -result["log_likelihood"] / (2 * math.log(2)))


def test_dequantisation_bounds_the_probability_of_the_bin():
    # the density is near constant over a bin of width 2/255, so log P(bin) ~ log p(x) + D log(2/255)
    model, x = GaussianVP(gamma_max=20.0), gaussian_data(20)
    continuous = ode_log_likelihood(model, x, exact_divergence=True, dequantise=False)["log_likelihood"]
    binned = ode_log_likelihood(model, x, exact_divergence=True, dequantise=True, seed=0)["log_likelihood"]
    torch.testing.assert_close(binned - continuous, torch.full_like(binned, 2 * math.log(BIN_WIDTH)), rtol=0, atol=0.05)


def test_hutchinson_is_unbiased_for_the_divergence():
    alpha, sigma = 0.8, 0.6
    x = gaussian_data(1).expand(4000, 2)
    probes = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    _, estimates = divergence(lambda z: exact_eps(z, alpha, sigma), x, probes)
    # eps* is linear in x: its divergence is sigma tr(Cov_t^{-1})
    exact = sigma * torch.linalg.inv(alpha**2 * SIGMA + sigma**2 * torch.eye(2, dtype=torch.float64)).trace()
    se = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - exact) < 4 * se
    _, exact_by_autograd = divergence(lambda z: exact_eps(z, alpha, sigma), x[:3])
    torch.testing.assert_close(exact_by_autograd, exact.expand(3))


@pytest.mark.parametrize(
    "kwargs, named",
    [({"x": torch.zeros(3, 5, dtype=torch.float64)}, "x must"), ({"rtol": 0.0}, "rtol"), ({"atol": -1.0}, "atol")],
)
def test_bad_arguments_name_the_argument(kwargs, named):
    with pytest.raises(ValueError, match=named):
        ode_log_likelihood(GaussianVP(), **{"x": gaussian_data(2), **kwargs})
