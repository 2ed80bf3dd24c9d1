"""The one diffusion interface: the chain and VDM answer the same questions the
same way (pyrovae/diffusion/base.py), their parts are the shared ones, and the
library's Gaussian KL is one function."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae.diffusion.base import DiffusionModel
from pyrovae.diffusion.chain import DiffusionChain
from pyrovae.diffusion.denoisers import TimeMLP
from pyrovae.diffusion.gamma import LinearGamma
from pyrovae.diffusion.schedule import NoiseSchedule
from pyrovae.diffusion.vdm import VDM
from pyrovae.infer.bound import Bound
from pyrovae.parts.kl import normal_kl
from pyrovae.parts.likelihoods import BinPosterior, Discretised, bin_centres
from pyrovae.parts.priors import StandardNormalPrior

D = 4


def chain(parameterization="eps", variance="beta_tilde") -> DiffusionChain:
    torch.manual_seed(0)
    net = TimeMLP(D, (8,), time_dim=4, out_mult=2 if variance == "learned" else 1)
    schedule = NoiseSchedule(torch.tensor([0.1, 0.25, 0.4, 0.6]))
    return DiffusionChain(net, schedule, D, "discretised", parameterization, variance).double()


def vdm(T=None) -> VDM:
    torch.manual_seed(0)
    return VDM(TimeMLP(D, (8,), time_dim=4), LinearGamma(), D, T=T).double()


def data(B=3) -> torch.Tensor:
    return torch.tensor([[0, 255, 128, 17], [3, 200, 255, 0], [90, 91, 92, 250]], dtype=torch.float64)[:B] / 127.5 - 1


# a time of each model's own axis, one per example of data()
MODELS = {"chain": (chain, torch.tensor([1, 2, 4])), "vdm": (vdm, torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64))}


@pytest.mark.parametrize("name", MODELS)
def test_both_models_are_diffusion_models_with_the_shared_parts(name):
    model = MODELS[name][0]()
    assert isinstance(model, DiffusionModel)
    assert isinstance(model.prior, StandardNormalPrior) and model.discrete


@pytest.mark.parametrize("name", MODELS)
def test_q_sample_is_alpha_x0_plus_sigma_noise_at_the_models_noise_levels(name):
    make, t = MODELS[name]
    model, x0 = make(), data()
    noise = torch.randn_like(x0)
    alpha, sigma = model.alpha_sigma(t)
    torch.testing.assert_close(model.q_sample(x0, t, noise), alpha[:, None] * x0 + sigma[:, None] * noise)
    torch.testing.assert_close(alpha.square() + sigma.square(), torch.ones_like(alpha))
    torch.testing.assert_close(model.log_snr(t), (alpha.square() / sigma.square()).log())


@pytest.mark.parametrize("parameterization", ["eps", "x0", "mean"])
def test_the_chains_eps_prediction_is_the_noise_its_x0_hat_implies(parameterization):
    model, x_t, t = chain(parameterization), data(), torch.tensor([2, 3, 4])
    eps = model.predict_eps(x_t, t)
    alpha, sigma = model.alpha_sigma(t)
    x0_hat = model.p_mean_variance(x_t, t)["x0_hat"]
    torch.testing.assert_close(alpha[:, None] * x0_hat + sigma[:, None] * eps, x_t)


def test_vdms_eps_prediction_is_the_denoiser_at_gamma_of_t():
    model, z, t = vdm(), data(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model.predict_eps(z, t), model.eps_hat(z, model.gamma(t)))


def test_vdm_p_step_at_times_is_the_step_of_its_literal_chain():
    model, z = vdm(T=4), data()
    with torch.no_grad():
        gammas = model.gamma(torch.arange(5, dtype=torch.float64) / 4)
        by_time, by_gamma = model.p_step(z, 0.75).base_dist, model._p_step(z, gammas[3], gammas[2]).base_dist
    torch.testing.assert_close(by_time.loc, by_gamma.loc)
    torch.testing.assert_close(by_time.scale, by_gamma.scale)


@pytest.mark.parametrize("name", MODELS)
def test_check_data_casts_to_the_models_dtype_and_names_what_is_wrong(name):
    model = MODELS[name][0]().float()
    assert model.check_data(data()).dtype == torch.float32
    with pytest.raises(TypeError, match="float tensor"):
        model.check_data(torch.zeros(2, D, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"shape \(batch >= 1, {D}\)"):
        model.check_data(torch.zeros(2, D + 1))
    with pytest.raises(ValueError, match="finite"):
        model.check_data(torch.full((2, D), float("nan")))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.check_data(torch.full((2, D), 2.0))


class ExactDenoiser(torch.nn.Module):
    def forward(self, z, tau):
        return 0.5 * z


def test_a_model_without_parameters_keeps_the_datas_dtype():
    model = VDM(ExactDenoiser(), LinearGamma(learn_ends=False), D)  # float32 buffers, no parameters
    assert model.check_data(data()).dtype == torch.float64


@pytest.mark.parametrize("name", MODELS)
def test_bound_is_a_bound_of_per_example_terms_in_bits_per_dim(name):
    model, x0 = MODELS[name][0](), data()
    with torch.no_grad():
        bound = model.bound(x0)
    assert isinstance(bound, Bound) and len(bound) == len(x0) and bound.dim == D
    assert bound.recon.shape == bound.kl_top.shape == bound.kl_layers.shape == (len(x0),)
    torch.testing.assert_close(bound.kl_top, model.prior_kl(x0))
    assert torch.isfinite(bound.bpd()).all()


def test_chain_bound_is_its_full_bound_term_by_term():
    model, x0 = chain(variance="learned"), data()
    pyro.set_rng_seed(0)
    with torch.no_grad():
        old = model.full_bound(x0)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        bound = model.bound(x0, per_layer=True)
    assert torch.equal(bound.recon, -old["terms"][:, 0]) and torch.equal(bound.kl_top, old["prior"])
    assert list(bound.layers) == ["kl_1", "kl_2", "kl_3"]
    assert torch.equal(torch.stack(list(bound.layers.values()), -1), old["terms"][:, 1:])
    torch.testing.assert_close(bound.nats(), old["total"])


def test_a_vdm_saved_before_it_held_a_prior_module_loads():
    model = vdm(T=2)
    old = {k: v for k, v in model.state_dict().items() if not k.startswith("prior.")}
    fresh = vdm(T=2)
    fresh.load_state_dict(fresh.upgrade_state_dict(old))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in old.items())


def test_vdms_decoder_is_the_parts_bin_posterior_on_the_discretised_likelihoods_bins():
    model = vdm()
    d = model.p_decoder(data())
    assert isinstance(d.base_dist, BinPosterior)
    levels = Discretised(torch.zeros(1), torch.ones(1), data_range=(-1.0, 1.0))._levels()
    assert torch.equal(levels, bin_centres())
    assert torch.equal(bin_centres(torch.float64), torch.arange(256, dtype=torch.float64) / 127.5 - 1)


# --- the one Gaussian KL ---------------------------------------------------------------


def torch_kl(mean_q, log_var_q, mean_p, log_var_p) -> torch.Tensor:
    q = dist.Normal(mean_q, (0.5 * log_var_q).exp())
    return torch.distributions.kl_divergence(q, dist.Normal(mean_p, (0.5 * log_var_p).exp()))


@pytest.mark.parametrize("shared_q", [False, True])
@pytest.mark.parametrize("shared_p", [False, True])
def test_normal_kl_is_the_gaussian_kl_summed_over_the_event_with_shared_variances(shared_q, shared_p):
    g = torch.Generator().manual_seed(0)
    B = 5
    mean_diff, scale = torch.randn(B, D, generator=g, dtype=torch.float64), torch.rand(B, generator=g) + 0.5
    log_var_q = torch.randn(B, 1 if shared_q else D, generator=g, dtype=torch.float64)
    log_var_p = torch.randn(B, 1 if shared_p else D, generator=g, dtype=torch.float64)
    want = torch_kl(scale[:, None] * mean_diff, log_var_q.expand(B, D), 0.0, log_var_p.expand(B, D)).sum(-1)
    torch.testing.assert_close(normal_kl(mean_diff, log_var_q, log_var_p, D, mean_scale=scale.double()), want)
    torch.testing.assert_close(normal_kl(scale[:, None] * mean_diff, log_var_q, log_var_p, D), want)


def test_normal_kl_with_equal_or_unit_variances_and_elementwise():
    g = torch.Generator().manual_seed(1)
    mean_diff, log_var = torch.randn(3, D, generator=g), torch.randn(3, 1, generator=g)
    torch.testing.assert_close(
        normal_kl(mean_diff, log_var, log_var, D), torch_kl(mean_diff, log_var, 0.0, log_var).sum(-1)
    )
    zeros = torch.zeros(3, D)
    torch.testing.assert_close(normal_kl(mean_diff, log_var, None), torch_kl(mean_diff, log_var, 0.0, zeros))
    torch.testing.assert_close(normal_kl(mean_diff, 0.3, None, D), torch_kl(mean_diff, zeros + 0.3, 0.0, zeros).sum(-1))
