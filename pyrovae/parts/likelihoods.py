"""Likelihoods p_theta(x|z): modules mapping the decoder's output to a Pyro
distribution over a flat ``x`` with ``event_shape == (x_dim,)``.

Every shipped likelihood reads one number per pixel from the decoder (logits
or a location); scales, where there are any, are learned per pixel by the
likelihood itself. ``binary_data`` says whether the data must be binarised
first. :data:`LIKELIHOODS` names them for ``--likelihood``.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn
from torch.nn.functional import logsigmoid, softplus

from pyrovae.parts.encoders import MIN_SCALE


class _LogitsLikelihood(nn.Module):
    """A likelihood whose decoder output is the logits of one distribution
    ``family`` per pixel, independent across the x_dim pixels."""

    family: type
    binary_data: bool

    def __init__(self, x_dim: int | None = None):
        super().__init__()

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return self.family(logits=logits).to_event(1)


class BernoulliLikelihood(_LogitsLikelihood):
    """p_theta(x|z) = prod_d Bernoulli(x_d; sigmoid(logits_d)); data must be binary."""

    family = dist.Bernoulli
    binary_data = True


class ContinuousBernoulliLikelihood(_LogitsLikelihood):
    """p_theta(x|z) = prod_d CB(x_d; sigmoid(logits_d)) for x in [0, 1]: the Bernoulli
    with its normalising constant (Loaiza-Ganem & Cunningham 2019), a proper
    density on grey-level pixels."""

    family = dist.ContinuousBernoulli
    binary_data = False


class GaussianLikelihood(nn.Module):
    """p_theta(x|z) = prod_d N(x_d; mu_d, sigma_d^2), mu from the decoder.

    :param scale: a fixed sigma, or ``None`` to learn one sigma per pixel
        (softplus of a parameter, floored at ``min_scale`` because constant
        pixels would otherwise drive sigma, and the density, without bound).
    """

    binary_data = False

    def __init__(self, x_dim: int, scale: float | None = None, min_scale: float = 1e-2):
        super().__init__()
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be > 0 or None (learned), got {scale}")
        self.min_scale = min_scale
        if scale is None:
            self.raw_scale = nn.Parameter(torch.zeros(x_dim))
        else:
            self.register_buffer("raw_scale", torch.full((x_dim,), float(scale)))
        self.learned = scale is None

    def forward(self, loc: torch.Tensor) -> dist.Distribution:
        scale = softplus(self.raw_scale) + self.min_scale if self.learned else self.raw_scale
        return dist.Normal(loc, scale).to_event(1)


class Discretized(dist.TorchDistribution):
    """A logistic or Gaussian with location ``loc`` and scale ``scale`` (on
    [-1, 1]) discretised into 256 bins: the probability of an 8-bit pixel
    x = k / 255 is the mass of the bin of width 2/255 around 2x - 1, with the
    first and last bins reaching to -inf and +inf (PixelCNN++; the DDPM decoder).

    So log p(x) is a log-probability of discrete data, comparable across
    models in nats or bits per dimension.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval
    CDFS = ("logistic", "normal")

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, cdf: str = "logistic", validate_args=None):
        if cdf not in self.CDFS:
            raise ValueError(f"unknown cdf {cdf!r}; expected one of {', '.join(self.CDFS)}")
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        self.cdf = cdf
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return Discretized(self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.cdf)

    def _log_cdf(self, u: torch.Tensor) -> torch.Tensor:
        return logsigmoid(u) if self.cdf == "logistic" else torch.special.log_ndtr(u)

    def _log_bin_mass(self, upper: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        """log(F(upper) - F(lower)) for upper > lower, F a symmetric CDF.

        Computed in the tail where both CDF values are small (flipping by
        F(u) = 1 - F(-u) when the bin lies right of the centre), as
        log F(a) + log(1 - exp(log F(b) - log F(a))), so that neither a bin far
        in the tail nor a bin near F = 1 loses its gradient to rounding.
        """
        flip = upper + lower > 0
        a = torch.where(flip, -lower, upper)
        b = torch.where(flip, -upper, lower)
        log_a, log_b = self._log_cdf(a), self._log_cdf(b)
        d = (log_b - log_a).clamp(max=-1e-12)
        log1mexp = torch.where(d > -math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))
        return log_a + log1mexp

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(x)
        centre = (2 * x - 1 - self.loc) / self.scale
        half = 1 / (255 * self.scale)
        upper, lower = centre + half, centre - half
        return torch.where(
            x < 0.5 / 255,
            self._log_cdf(upper),
            torch.where(x > 254.5 / 255, self._log_cdf(-lower), self._log_bin_mass(upper, lower)),
        )

    def _bin_probs(self) -> torch.Tensor:
        """P(x = k / 255) for k = 0..255, shape ``batch_shape + (256,)``."""
        edges = torch.linspace(-1 + 1 / 255, 1 - 1 / 255, 255, device=self.loc.device, dtype=self.loc.dtype)
        u = (edges - self.loc.unsqueeze(-1)) / self.scale.unsqueeze(-1)
        cdf = torch.sigmoid(u) if self.cdf == "logistic" else torch.special.ndtr(u)
        zeros, ones = cdf.new_zeros(cdf.shape[:-1] + (1,)), cdf.new_ones(cdf.shape[:-1] + (1,))
        return torch.cat([cdf, ones], -1) - torch.cat([zeros, cdf], -1)

    @property
    def mean(self) -> torch.Tensor:
        levels = torch.arange(256, device=self.loc.device, dtype=self.loc.dtype) / 255
        return (self._bin_probs() * levels).sum(-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            k = dist.Categorical(probs=self._bin_probs().clamp(min=0)).sample(sample_shape)
            return k.to(self.loc.dtype) / 255


class DiscretizedLogisticLikelihood(nn.Module):
    """p_theta(x|z) = prod_d Discretized(x_d; mu_d, s_d) over 8-bit pixels with a
    logistic CDF, mu from the decoder (on [-1, 1]), s learned per pixel."""

    binary_data = False
    cdf = "logistic"

    def __init__(self, x_dim: int):
        super().__init__()
        self.raw_scale = nn.Parameter(torch.zeros(x_dim))

    def forward(self, loc: torch.Tensor) -> dist.Distribution:
        return Discretized(loc, softplus(self.raw_scale) + MIN_SCALE, self.cdf).to_event(1)


class DiscretizedGaussianLikelihood(DiscretizedLogisticLikelihood):
    """As :class:`DiscretizedLogisticLikelihood` with a Gaussian CDF (the DDPM decoder's)."""

    cdf = "normal"


LIKELIHOODS = {
    "bernoulli": BernoulliLikelihood,
    "continuous-bernoulli": ContinuousBernoulliLikelihood,
    "gaussian": GaussianLikelihood,
    "discretized-logistic": DiscretizedLogisticLikelihood,
    "discretized-gaussian": DiscretizedGaussianLikelihood,
}
"""Likelihood classes by name, each constructed as ``cls(x_dim)``."""
