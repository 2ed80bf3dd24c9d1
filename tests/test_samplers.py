"""The samplers on Gaussian data, where the exact eps-predictor and the
probability-flow ODE's map are known in closed form (tests/gaussian_diffusion.py)."""

import math

import pytest
import torch
from gaussian_diffusion import MU, SIGMA, ExactChainNet, ExactVDMNet, GaussianVP, exact_flow

from pyrovae.diffusion import VDM, DiffusionChain, LinearGamma, NoiseSchedule
from pyrovae.diffusion.samplers import SAMPLERS, encode, sample


def exact_chain(T: int = 1000, schedule: str = "linear") -> DiffusionChain:
    s = NoiseSchedule.from_name(schedule, T)
    return DiffusionChain(ExactChainNet(s.alphas_cumprod), s, x_dim=2).double()


def flow_error(model, sampler: str, steps: int, x_T: torch.Tensor, exact: torch.Tensor) -> float:
    return float((sample(model, len(x_T), steps, sampler, x_T=x_T) - exact).norm(dim=1).mean())


@pytest.mark.parametrize("sampler, steps", [("ddim", 500), ("dpm-solver++", 50)])
def test_deterministic_samplers_map_noise_to_the_data_distribution(sampler, steps):
    # enough steps that the solver's bias (first order: ~7% of Sigma at 50 DDIM steps) is below the SE
    n = 10000
    x = sample(GaussianVP(), n, steps, sampler, seed=0)
    # mean: SE sqrt(Sigma_ii / n); covariance entries: SE sqrt((Sigma_ii Sigma_jj + Sigma_ij^2) / n)
    mean_se = (SIGMA.diagonal() / n).sqrt()
    assert ((x.mean(0) - MU).abs() < 4 * mean_se).all()
    cov_se = ((SIGMA.diagonal()[:, None] * SIGMA.diagonal()[None, :] + SIGMA**2) / n).sqrt()
    assert ((torch.cov(x.T) - SIGMA).abs() < 4 * cov_se).all()


@pytest.mark.parametrize("sampler, order", [("ddim", 1), ("dpm-solver++", 2)])
def test_the_error_against_the_exact_flow_shrinks_at_the_solvers_order(sampler, order):
    view = GaussianVP()
    x_T = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = view.flow(x_T, 1.0, 0.0) / view.alpha_sigma(0.0)[0]
    coarse, fine = (flow_error(view, sampler, k, x_T, exact) for k in (40, 80))
    # doubling the steps divides the error by about 2^order
    assert 2 ** (order - 0.5) < coarse / fine < 2 ** (order + 0.5)


@pytest.mark.parametrize("sampler, steps, tol", [("ddim", 50, 0.05), ("dpm-solver++", 20, 0.01)])
def test_deterministic_samplers_on_the_chain_follow_the_exact_flow(sampler, steps, tol):
    chain = exact_chain()
    x_T = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = math.sqrt(float(chain.schedule.alphas_cumprod[-1]))
    exact = exact_flow(x_T, a, math.sqrt(1 - a * a), 1.0, 0.0)
    assert flow_error(chain, sampler, steps, x_T, exact) < tol


def test_dpm_solver_on_vdm_follows_the_exact_flow_of_its_gamma():
    vdm = VDM(ExactVDMNet(), LinearGamma(learn_ends=False), x_dim=2).double()
    x_T = torch.randn(100, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gamma = vdm.gamma(torch.tensor([1.0, 0.0], dtype=torch.float64))
    (alpha_1, alpha_0), (sigma_1, sigma_0) = torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()
    exact = exact_flow(x_T, alpha_1, sigma_1, alpha_0, sigma_0) / alpha_0
    assert flow_error(vdm, "dpm-solver++", 20, x_T, exact) < 0.01


@pytest.mark.parametrize("model", [GaussianVP(), exact_chain(schedule="cosine")], ids=["vdm-like", "chain"])
def test_ddim_inversion_then_decoding_returns_x(model):
    x = MU + torch.randn(50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) @ SIGMA.sqrt()

    def round_trip(steps):
        return float((sample(model, 50, steps, "ddim", x_T=encode(model, x, steps)) - x).norm(dim=1).max())

    coarse, fine = round_trip(25), round_trip(100)
    # first order: four times the steps, about a quarter of the error, O(1 / steps)
    assert fine < coarse / 3
    assert fine < 10 / 100


def test_ddim_eta_one_equals_the_respaced_ancestral_chain_on_the_same_draws():
    chain = exact_chain(T=100)
    torch.manual_seed(3)
    ancestral = chain.sample(20, steps=10, clip_x0=False)
    torch.manual_seed(3)
    ddim = sample(chain, 20, 10, "ddim", eta=1.0)
    torch.testing.assert_close(ddim, ancestral, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_seed_repeats_the_draws_without_touching_the_global_generator(sampler):
    chain = exact_chain(T=50)
    torch.manual_seed(0)
    a = sample(chain, 5, 5, sampler, seed=7)
    after = torch.randn(1)
    torch.manual_seed(0)
    b = sample(chain, 5, 5, sampler, seed=7)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.randn(1), after)


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"sampler": "euler"}, "ancestral, ddim, dpm-solver++"),
        ({"steps": 0}, "steps"),
        ({"steps": 51}, "steps"),
        ({"eta": 1.5, "sampler": "ddim"}, "eta"),
        ({"eta": -0.1, "sampler": "ddim"}, "eta"),
        ({"spacing": "karras", "sampler": "ddim"}, "spacing"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, named):
    with pytest.raises(ValueError, match=named):
        sample(exact_chain(T=50), 2, **{"steps": 5, **kwargs})


def test_a_model_without_the_view_is_a_type_error():
    with pytest.raises(TypeError, match="model must be"):
        sample(object(), 2, 5, "ddim")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [1, 2, 20, 1000])
def test_the_chains_logsnr_grid_is_k_distinct_steps_from_t_to_1_then_0(schedule, steps):
    from pyrovae.diffusion.samplers import ChainView

    times = ChainView(exact_chain(schedule=schedule)).grid(steps, "logsnr")
    assert len(times) == steps + 1 and times[0] == 1000 and times[-1] == 0
    assert all(a > b for a, b in zip(times, times[1:])) and all(t == int(t) for t in times)
    if steps > 1:
        assert times[-2] == 1
