"""The one discretised distribution (the VAE's likelihood and the diffusion
chain's decoder): a pmf over 256 levels on either data range, exact in the tails."""

import mpmath
import pytest
import torch

from pyrovae.parts.likelihoods import LIKELIHOODS, MODEL_SCALE, Discretised, DiscretisedGaussianLikelihood

RANGES = [(0.0, 1.0), (-1.0, 1.0)]


def levels(data_range, dtype=torch.float64):
    lo, hi = data_range
    return lo + (hi - lo) * torch.arange(256, dtype=dtype) / 255


@pytest.mark.parametrize("data_range", RANGES)
@pytest.mark.parametrize("cdf", Discretised.CDFS)
@pytest.mark.parametrize("loc,scale", [(0.3, 0.01), (0.999, 1e-3), (-3.0, 0.5), (0.0, 5.0), (0.5, 1e-6)])
def test_discretised_is_a_pmf_over_the_256_levels_of_its_data_range(data_range, cdf, loc, scale):
    d = Discretised(
        torch.full((256,), loc, dtype=torch.float64), torch.full((256,), scale, dtype=torch.float64), cdf, data_range
    )
    x = levels(data_range)
    p = d.log_prob(x).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert d.mean[0].item() == pytest.approx((p * x).sum().item(), abs=1e-9)
    draws = d.sample((50,))
    assert set(draws.reshape(-1).tolist()) <= set(x.tolist())


def test_the_data_range_only_relabels_the_levels():
    loc, scale = torch.tensor([-0.2, 0.7]), torch.tensor([0.05, 0.3])
    k = torch.tensor([90.0, 255.0])
    pixels = Discretised(loc, scale, "normal", (0.0, 1.0)).log_prob(k / 255)
    chain = Discretised(loc, scale, "normal", (-1.0, 1.0)).log_prob(k / 127.5 - 1)
    torch.testing.assert_close(pixels, chain)
    # the bulk of a bin: the Gaussian mass of the bin, computed directly
    normal = torch.distributions.Normal(loc.double(), scale.double())
    u = k[0].double() / 127.5 - 1
    mass = normal.cdf(u + 1 / 255)[0] - normal.cdf(u - 1 / 255)[0]
    assert chain[0].item() == pytest.approx(mass.log().item(), rel=1e-6)


def reference_log_mass(u: float, loc: float, scale: float, cdf: str) -> float:
    """log P(bin at u) with 60 significant digits, each mass taken from the tail
    it lies in so that no digit is lost to 1 - F."""
    mpmath.mp.dps = 60
    F = mpmath.ncdf if cdf == "normal" else (lambda z: 1 / (1 + mpmath.exp(-z)))
    u, loc, scale, h = mpmath.mpf(u), mpmath.mpf(loc), mpmath.mpf(scale), mpmath.mpf(1) / 255
    upper, lower = (u + h - loc) / scale, (u - h - loc) / scale
    if u < -1 + h:
        return float(mpmath.log(F(upper)))
    if u > 1 - h:
        return float(mpmath.log(F(-lower)))
    if lower > 0:
        return float(mpmath.log(F(-lower) - F(-upper)))
    return float(mpmath.log(F(upper) - F(lower)))


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 2e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("cdf", Discretised.CDFS)
def test_discretised_log_prob_is_exact_to_minus_ten_thousand_nats_with_nonzero_gradients(dtype, rtol, cdf):
    # every bin kind (both edges, next to them, the middle) against locations
    # from inside the range to far outside it, at four scales
    k = torch.tensor([0, 1, 50, 127, 128, 200, 254, 255], dtype=dtype)
    loc = torch.linspace(-40, 40, 33, dtype=dtype)
    scale = torch.tensor([1e-3, 1e-2, 0.1, 1.0], dtype=dtype)
    k, loc, scale = (a.reshape(-1) for a in torch.meshgrid(k, loc, scale, indexing="ij"))
    x = k / 255
    loc = loc.clone().requires_grad_(True)
    log_p = Discretised(loc, scale, cdf, (0.0, 1.0)).log_prob(x)
    log_p.sum().backward()
    u = (2 * x - 1).tolist()
    ref = torch.tensor(
        [reference_log_mass(ui, li, si, cdf) for ui, li, si in zip(u, loc.tolist(), scale.tolist())],
        dtype=torch.float64,
    )
    keep = ref > -1.05e4
    assert ref[keep].min() < -9e3 and keep.sum() > 400  # the test reaches -10^4 nats
    err = (log_p.double() - ref).abs()
    worst = (err / ref.abs().clamp(min=1))[keep].max().item()
    assert worst < rtol, worst
    # far from its bin (below -1 nat) the mass still moves with loc, the right way:
    # up if the bin lies above loc
    far = keep & (ref < -1)
    grad, centre = loc.grad.double()[far], torch.tensor(u, dtype=torch.float64)[far]
    assert torch.isfinite(loc.grad).all() and (grad != 0).all()
    assert (torch.sign(grad) == torch.sign(centre - loc.detach().double()[far])).all()


def test_likelihood_with_a_model_scale_owns_no_parameters_and_needs_the_scale():
    lik = DiscretisedGaussianLikelihood(4, scale=MODEL_SCALE, data_range=(-1.0, 1.0))
    assert list(lik.state_dict()) == []
    d = lik(torch.zeros(3, 4), torch.full((3, 4), 0.1))
    assert d.batch_shape == (3,) and d.event_shape == (4,)
    with pytest.raises(ValueError, match="scale"):
        lik(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="scale"):
        DiscretisedGaussianLikelihood(4)(torch.zeros(3, 4), torch.ones(3, 4))


def test_old_spellings_name_the_same_likelihoods():
    assert LIKELIHOODS["discretised-logistic"] is LIKELIHOODS["discretised-logistic"]
    assert "discretized-gaussian" in LIKELIHOODS and LIKELIHOODS["discretised"] is DiscretisedGaussianLikelihood
    assert "discretized-gaussian" not in list(LIKELIHOODS)  # --help lists one spelling
    with pytest.raises(ValueError, match="data_range"):
        Discretised(torch.zeros(1), torch.ones(1), "normal", (1.0, 0.0))
