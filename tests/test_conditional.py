"""Conditioning inputs y (issue 25, items 1-2): CVAE/HVAE, the conditional chain
and VDM, and classifier-free guidance."""

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyrovae.diffusion import samplers
from pyrovae.diffusion.chain import DiffusionChain
from pyrovae.diffusion.denoisers import TimeMLP, UNet
from pyrovae.diffusion.gamma import make_gamma
from pyrovae.diffusion.schedule import NoiseSchedule
from pyrovae.diffusion.vdm import VDM
from pyrovae.hvae import build_hvae
from pyrovae.infer import TraceAnalyticKL_ELBO
from pyrovae.infer.diffusion_elbo import DiffusionELBO
from pyrovae.infer.vdm_elbo import VDMELBO
from pyrovae.vae import build_vae

K, D = 3, 6


def binary(n=8, seed=0):
    return torch.bernoulli(torch.full((n, D), 0.5), generator=torch.Generator().manual_seed(seed))


def classes(n=8):
    return torch.arange(n) % K


def chain_twins(net=TimeMLP, **kw):
    """An unconditional chain and its conditional twin: the same initial weights but the y embedding."""
    torch.manual_seed(0)
    plain = DiffusionChain(net(D, (16, 16), **kw), NoiseSchedule.from_name("linear", 20), D)
    torch.manual_seed(0)
    cond = DiffusionChain(net(D, (16, 16), num_classes=K, **kw), NoiseSchedule.from_name("linear", 20), D)
    return plain, cond


@pytest.mark.parametrize("net", [TimeMLP, UNet])
def test_unconditional_denoiser_is_the_conditional_one_with_a_zero_embedding(net):
    make = (lambda **kw: TimeMLP(D, (16, 16), **kw)) if net is TimeMLP else (lambda **kw: UNet((1, 4, 4), 8, **kw))
    torch.manual_seed(0)
    plain = make()
    torch.manual_seed(0)
    cond = make(num_classes=K)
    assert set(cond.state_dict()) - set(plain.state_dict()) == {"label.proj.weight"}
    with torch.no_grad():  # the U-Net's zero-initialised layers would hide every input
        for p in plain.parameters():
            p.normal_(0, 0.3)
    cond.load_state_dict(plain.state_dict(), strict=False)
    x, t = torch.randn(6, plain.x_dim), torch.rand(6) * 1000
    y = torch.arange(6) % K
    torch.nn.init.normal_(cond.label.proj.weight)
    assert not torch.allclose(cond(x, t, y), cond(x, t, (y + 1) % K))  # y reaches the prediction
    torch.nn.init.zeros_(cond.label.proj.weight)
    assert torch.equal(plain(x, t), cond(x, t, y))


def test_null_class_embeds_to_zero():
    torch.manual_seed(0)
    net = TimeMLP(D, (16,), num_classes=K)
    x, t = torch.randn(4, D), torch.rand(4) * 1000
    assert torch.equal(net(x, t, torch.full((4,), -1)), net(x, t))


def test_cvae_y_reaches_decoder_and_encoder():
    pyro.set_rng_seed(0)
    vae = build_vae(D, 2, (8,), num_classes=K)
    x, y = binary(), classes()
    z = torch.randn(8, 2)
    assert not torch.allclose(vae.decode(z, y), vae.decode(z, (y + 1) % K))
    assert not torch.allclose(vae.encode(x, y=y), vae.encode(x, y=(y + 1) % K))


def test_cvae_with_zero_y_columns_is_the_unconditional_vae():
    torch.manual_seed(0)
    plain = build_vae(D, 2, (8,))
    cvae = build_vae(D, 2, (8,), num_classes=K)
    with torch.no_grad():
        for name, p in cvae.named_parameters():
            q = dict(plain.named_parameters())[name]
            if p.shape == q.shape:
                p.copy_(q)
            else:  # the first layers: the x (or z) columns are the VAE's, the y columns zero
                p.zero_()
                p[:, : q.shape[1]] = q
    x, y = binary(), classes()
    z = torch.randn(8, 2)
    assert torch.equal(plain.decode(z), cvae.decode(z, y))
    assert torch.equal(plain.encode(x), cvae.encode(x, y=y))


def test_unconditional_hvae_has_no_new_parameters():
    torch.manual_seed(0)
    a = build_hvae(D, (3, 2), (8, 4))
    torch.manual_seed(0)
    b = build_hvae(D, (3, 2), (8, 4))
    assert a.conditioning is None and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("encoder", ["bottom-up", "top-down"])
def test_conditional_bound_equals_trace_elbo_in_expectation(encoder):
    pyro.set_rng_seed(0)
    hvae = build_hvae(D, (3, 2), (8, 4), encoder=encoder, num_classes=K)
    x, y = binary(4), classes(4)
    analytic = -TraceAnalyticKL_ELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1).loss(
        hvae.model, hvae.guide, x, y
    )
    draws = torch.tensor(
        [-Trace_ELBO(num_particles=1).loss(hvae.model, hvae.guide, x, y) for _ in range(500)], dtype=torch.float64
    )
    # 5 standard errors of the Trace_ELBO mean (the analytic estimate's own error is smaller)
    assert abs(draws.mean() - analytic) < 5 * draws.std() / len(draws) ** 0.5 + 1e-3
    bound = hvae.bound(x, 200, y=y)
    assert abs(bound.elbo().sum() - analytic) < 5 * draws.std() / 200**0.5


def test_chain_and_vdm_bounds_depend_on_y():
    _, chain = chain_twins()
    torch.nn.init.normal_(chain.net.label.proj.weight)
    x0 = torch.rand(8, D) * 2 - 1
    y = classes()
    with torch.no_grad():
        pyro.set_rng_seed(1)
        a = DiffusionELBO().differentiable_loss(chain.model, chain.guide, x0, y)
        pyro.set_rng_seed(1)
        b = DiffusionELBO().differentiable_loss(chain.model, chain.guide, x0, (y + 1) % K)
    assert a != b
    torch.manual_seed(0)
    vdm = VDM(TimeMLP(D, (16,), num_classes=K), make_gamma("fixed"), D)
    torch.nn.init.normal_(vdm.net.label.proj.weight)
    with torch.no_grad():
        pyro.set_rng_seed(1)
        a = VDMELBO().differentiable_loss(vdm.model, vdm.guide, x0, y)
        pyro.set_rng_seed(1)
        b = VDMELBO().differentiable_loss(vdm.model, vdm.guide, x0, (y + 1) % K)
    assert a != b


def test_conditional_chain_with_zero_embedding_has_the_unconditional_bound():
    plain, cond = chain_twins()
    torch.nn.init.zeros_(cond.net.label.proj.weight)
    x0 = torch.rand(8, D) * 2 - 1
    with torch.no_grad():
        pyro.set_rng_seed(1)
        a = DiffusionELBO().differentiable_loss(plain.model, plain.guide, x0)
        pyro.set_rng_seed(1)
        b = DiffusionELBO().differentiable_loss(cond.model, cond.guide, x0, classes())
    assert torch.equal(a, b)


def test_literal_conditional_chain_traces_with_y():
    _, chain = chain_twins()
    x0 = torch.rand(4, D) * 2 - 1
    loss = Trace_ELBO().loss(chain.model, chain.guide, x0, classes(4))
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize("sampler", ["ancestral", "ddim", "dpm-solver++"])
def test_guidance_zero_is_the_conditional_sampler(sampler):
    _, chain = chain_twins()
    torch.nn.init.normal_(chain.net.label.proj.weight)
    y = classes(5)
    a = samplers.sample(chain, 5, 10, sampler, seed=3, y=y)
    b = samplers.sample(chain, 5, 10, sampler, seed=3, y=y, guidance=0.0)
    c = samplers.sample(chain, 5, 10, sampler, seed=3, y=y, guidance=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_guidance_is_the_weighted_difference():
    _, chain = chain_twins()
    torch.nn.init.normal_(chain.net.label.proj.weight)
    from pyrovae.diffusion.denoisers import conditioned

    y, x, t = classes(4), torch.randn(4, D), torch.rand(4) * 1000
    guided = conditioned(chain, y, 3.0).net(x, t)
    expected = 4.0 * chain.net(x, t, y) - 3.0 * chain.net(x, t, torch.full_like(y, -1))
    assert torch.allclose(guided, expected)


def test_vdm_guidance_zero_is_the_conditional_sampler():
    torch.manual_seed(0)
    vdm = VDM(TimeMLP(D, (16,), num_classes=K), make_gamma("fixed"), D)
    y = classes(4)
    a = samplers.sample(vdm, 4, 8, "ddim", seed=0, y=y)
    b = samplers.sample(vdm, 4, 8, "ddim", seed=0, y=y, guidance=0.0)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, x: m.bound(x, 2, y=torch.full((8,), 12)), ValueError, r"classes in \[0, 3\)"),
        (lambda m, x: m.bound(x, 2, y=torch.rand(8)), TypeError, "integer classes"),
        (lambda m, x: m.bound(x, 2), ValueError, "conditional: give y"),
        (lambda m, x: m.sample(8, torch.arange(3)), ValueError, r"shape \(8,\)"),
    ],
)
def test_cvae_bad_y_is_refused(call, error, match):
    pyro.set_rng_seed(0)
    with pytest.raises(error, match=match):
        call(build_vae(D, 2, (8,), num_classes=K), binary())


def test_bad_inputs_to_the_conditional_chain_are_refused():
    plain, chain = chain_twins()
    with pytest.raises(ValueError, match="unconditional"):
        plain.sample(2, y=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="guidance must be a number w >= 0"):
        chain.sample(2, y=torch.zeros(2, dtype=torch.long), guidance=-1.0)
    with pytest.raises(TypeError, match="integer classes"):
        chain.sample(2, y=torch.zeros(2))
    with pytest.raises(ValueError, match="unconditional"):
        build_vae(D, 2, (8,)).sample(2, torch.zeros(2, dtype=torch.long))


def test_float_y_conditions_the_vae():
    pyro.set_rng_seed(0)
    vae = build_vae(D, 2, (8,), y_shape=(2, 2))
    y = torch.rand(8, 2, 2)
    bound = vae.bound(binary(), 2, y=y)
    assert bound.elbo().shape == (8,)
    with pytest.raises(ValueError, match=r"shape \(8, \*\(2, 2\)\)"):
        vae.bound(binary(), 2, y=torch.rand(8, 4))
