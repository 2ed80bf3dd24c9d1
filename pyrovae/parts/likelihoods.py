"""Likelihoods p_theta(x|z): modules mapping the decoder's output to a Pyro
distribution over a flat ``x`` with ``event_shape == (x_dim,)``.

Every shipped likelihood reads one number per pixel from the decoder (logits
or a location); scales, where there are any, are learned per pixel by the
likelihood itself, fixed, or given by the model (the diffusion chain's
p_theta(x_0|x_1) takes sigma_1 from the chain). ``binary_data`` says whether
the data must be binarised first; ``discrete`` whether the likelihood is a
probability mass function (then a bound is a bound on the discrete data's
log-probability and converts to bits/dim). :data:`LIKELIHOODS` names them for
``--likelihood``.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn
from torch.nn.functional import binary_cross_entropy_with_logits, logsigmoid, softplus

from pyrovae.parts.encoders import MIN_SCALE
from pyrovae.registry import lookup


class _LogitsLikelihood(nn.Module):
    """A likelihood whose decoder output is the logits of one distribution
    ``family`` per pixel, independent across the x_dim pixels."""

    family: type
    binary_data: bool
    discrete: bool

    def __init__(self, x_dim: int | None = None):
        super().__init__()

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return self.family(logits=logits).to_event(1)


class IndependentBernoulli(dist.Independent):
    """prod_d Bernoulli(x_d; sigmoid(logits_d)) over the rightmost dimension:
    ``Bernoulli(logits=logits).to_event(1)`` (construct it as
    ``IndependentBernoulli(dist.Bernoulli(logits=logits), 1)``) whose
    :meth:`log_prob` negates the sum over pixels instead of each pixel,

        log p(x) = -sum_d BCE(logits_d, x_d),   BCE(l, x) = softplus(l) - x l,

    the same numbers bit for bit (negation is exact) with one pass fewer over
    the B x D pixels in the forward pass and one in the backward pass: in a
    small VAE's step that pass costs as much as a few hundred operations' overhead."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        base = self.base_dist
        if base._validate_args:
            base._validate_sample(value)
        logits = base.logits
        if logits.shape != value.shape:
            logits, value = torch.broadcast_tensors(logits, value)
        return -binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


class BernoulliLikelihood(_LogitsLikelihood):
    """p_theta(x|z) = prod_d Bernoulli(x_d; sigmoid(logits_d)); data must be binary."""

    family = dist.Bernoulli
    binary_data = True
    discrete = True

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return IndependentBernoulli(dist.Bernoulli(logits=logits), 1)


class ContinuousBernoulliLikelihood(_LogitsLikelihood):
    """p_theta(x|z) = prod_d CB(x_d; sigmoid(logits_d)) for x in [0, 1]: the Bernoulli
    with its normalising constant (Loaiza-Ganem & Cunningham 2019), a proper
    density on grey-level pixels."""

    family = dist.ContinuousBernoulli
    binary_data = False
    discrete = False


BINS = 256
"""8-bit data: 256 levels, the discretised likelihoods' bins."""


def bin_centres(dtype=torch.float32, device=None, data_range: tuple = (-1.0, 1.0)) -> torch.Tensor:
    """The 256 levels x_k = lo + (hi - lo) k / 255 of 8-bit data on ``data_range``
    = (lo, hi); on [-1, 1] exactly the values the data are scaled to
    (k / 127.5 - 1), so that data and bins match bit for bit."""
    lo, hi = data_range
    return lo + (hi - lo) * torch.arange(BINS, dtype=dtype, device=device) / (BINS - 1)


def bin_index(x: torch.Tensor, data_range: tuple = (-1.0, 1.0)) -> torch.Tensor:
    """The (unrounded) level k of a value on ``data_range``, (x - lo) 255 / (hi - lo);
    :func:`bin_value` maps it back."""
    lo, hi = data_range
    return (x - lo) * ((BINS - 1) / (hi - lo))


def bin_value(k: torch.Tensor, data_range: tuple = (-1.0, 1.0)) -> torch.Tensor:
    """The value of level ``k`` on ``data_range``, k (hi - lo) / 255 + lo."""
    lo, hi = data_range
    return k / ((BINS - 1) / (hi - lo)) + lo


class Discretised(dist.TorchDistribution):
    """A Gaussian or logistic discretised to the 256 levels of 8-bit data (the
    VAE's likelihood and the diffusion chain's p_theta(x_0|x_1), Ho et al. 2020
    eq. 13; PixelCNN++): the mass of each bin of a continuous distribution
    centred at ``loc``. Its sibling :class:`BinPosterior` (VDM's p(x|z_0)) is
    the other way round, a posterior over the same bins given a noisy value;
    both share the bins (:data:`BINS`, :func:`bin_centres`).

    ``loc`` and ``scale`` live on the standard scale [-1, 1], where level k
    (k = 0..255) is the bin centred at u_k = -1 + 2k/255 with half-width 1/255;
    the data x live on ``data_range = (lo, hi)`` with x_k = lo + (hi - lo) k/255
    (the VAE's pixels: (0, 1); the chain's: (-1, 1)), mapped to the standard
    scale by u = (2x - lo - hi) / (hi - lo). With F the standard normal (``cdf
    = "normal"``) or logistic CDF, elementwise

        P(x_k) = F((u_k + 1/255 - loc) / scale) - F((u_k - 1/255 - loc) / scale),

    the first bin extended to -inf and the last to +inf, so the 256 masses sum
    to 1. A probability mass function: an ELBO with it bounds the log-probability
    of the discrete data, in nats or bits/dim. :meth:`log_prob` is computed in
    log space (:meth:`_log_bin_mass`), exact to rounding far into the tails
    (tested to -10^4 nats in float32 and float64), where its gradient stays
    nonzero.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    CDFS = ("logistic", "normal")

    def __init__(
        self,
        loc: torch.Tensor,
        scale: torch.Tensor,
        cdf: str = "logistic",
        data_range: tuple = (0.0, 1.0),
        validate_args=None,
    ):
        lookup("cdf", cdf, self.CDFS)
        lo, hi = (float(v) for v in data_range)
        if not hi > lo:
            raise ValueError(f"data_range must be (low, high) with high > low, got {tuple(data_range)}")
        self.loc, self.scale = torch.broadcast_tensors(torch.as_tensor(loc), torch.as_tensor(scale))
        self.cdf, self.data_range = cdf, (lo, hi)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(*self.data_range)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return Discretised(self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.cdf, self.data_range)

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

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """Data on ``data_range`` -> the standard scale [-1, 1] of ``loc``."""
        lo, hi = self.data_range
        return (2 * x - (lo + hi)) / (hi - lo)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(x)
        u = self.standardise(x)
        centre = (u - self.loc) / self.scale
        half = 1 / ((BINS - 1) * self.scale)
        upper, lower = centre + half, centre - half
        edge = 1 - 1 / (BINS - 1)
        return torch.where(
            u < -edge,
            self._log_cdf(upper),
            torch.where(u > edge, self._log_cdf(-lower), self._log_bin_mass(upper, lower)),
        )

    def _bin_probs(self) -> torch.Tensor:
        """P(x_k) for k = 0..255, shape ``batch_shape + (256,)``."""
        edges = torch.linspace(
            -1 + 1 / (BINS - 1), 1 - 1 / (BINS - 1), BINS - 1, device=self.loc.device, dtype=self.loc.dtype
        )
        u = (edges - self.loc.unsqueeze(-1)) / self.scale.unsqueeze(-1)
        cdf = torch.sigmoid(u) if self.cdf == "logistic" else torch.special.ndtr(u)
        zeros, ones = cdf.new_zeros(cdf.shape[:-1] + (1,)), cdf.new_ones(cdf.shape[:-1] + (1,))
        return torch.cat([cdf, ones], -1) - torch.cat([zeros, cdf], -1)

    def _levels(self) -> torch.Tensor:
        return bin_centres(self.loc.dtype, self.loc.device, self.data_range)

    @property
    def mean(self) -> torch.Tensor:
        return (self._bin_probs() * self._levels()).sum(-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            k = dist.Categorical(probs=self._bin_probs().clamp(min=0)).sample(sample_shape)
            return self._levels()[k]


class BinPosterior(dist.TorchDistribution):
    """p(x | z_0) per pixel, VDM's decoder: the posterior over the 256 bin centres
    x_k (:func:`bin_centres`) of a noisy value u ~ N(x_k, v) under a uniform prior on k,

        p(x_k | u) = exp(-(u - x_k)^2 / (2 v)) / sum_j exp(-(u - x_j)^2 / (2 v)),

    with u = z_0 / alpha_0 and v = exp(gamma_0) (VDM's logits form). ``loc`` is
    u, ``scale`` is sqrt(v) (broadcast to ``loc``); values are bin centres on
    ``data_range``. Where :class:`Discretised` integrates a density centred at
    ``loc`` over each bin, this weighs each bin centre by the density *of*
    ``loc`` around it: no parameters but v, no special edge bins, and the
    point mass at the nearest centre as v -> 0.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, data_range: tuple = (-1.0, 1.0), validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        self.data_range = tuple(float(v) for v in data_range)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.interval(*self.data_range)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(BinPosterior, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.scale, new.data_range = (
            self.loc.expand(batch_shape),
            self.scale.expand(batch_shape),
            self.data_range,
        )
        super(BinPosterior, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def logits(self) -> torch.Tensor:
        """Normalised log-probabilities of the 256 bins, shape ``batch_shape + (256,)``."""
        x_k = bin_centres(self.loc.dtype, self.loc.device, self.data_range)
        logits = -0.5 * ((self.loc[..., None] - x_k) / self.scale[..., None]).square()
        return logits - logits.logsumexp(-1, keepdim=True)

    def log_normaliser(self) -> torch.Tensor:
        """log sum_k exp(-(u - x_k)^2 / (2 v)), ``batch_shape``, summed over the
        bins within 12 sqrt(v) + 1 bin of the bin nearest u only: every bin left
        out is at least 12 standard deviations further than that bin, so the
        mass left out is below 256 e^{-72} ~ 1e-29 of the sum (exact in float32
        and float64). At VDM's gamma_0 = -13.3 this is 7 bins instead of 256."""
        lo, hi = self.data_range
        bin_width = (hi - lo) / (BINS - 1)
        window = min(BINS - 1, math.ceil(12 * float(self.scale.detach().max()) / bin_width) + 1)
        nearest = bin_index(self.loc.detach(), self.data_range).round().clamp(0, BINS - 1)
        index = nearest[..., None] + torch.arange(-window, window + 1, dtype=self.loc.dtype, device=self.loc.device)
        x_k = bin_value(index, self.data_range)
        logits = -0.5 * ((self.loc[..., None] - x_k) / self.scale[..., None]).square()
        return logits.masked_fill((index < 0) | (index > BINS - 1), -math.inf).logsumexp(-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        x_k = bin_value(bin_index(value.clamp(*self.data_range), self.data_range).round(), self.data_range)
        return -0.5 * ((self.loc - x_k) / self.scale).square() - self.log_normaliser()

    @property
    def mean(self) -> torch.Tensor:
        return (self.logits().exp() * bin_centres(self.loc.dtype, self.loc.device, self.data_range)).sum(-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            logits = self.logits().expand(self._extended_shape(sample_shape) + (BINS,))
            k = torch.distributions.Categorical(logits=logits).sample()
            return bin_centres(self.loc.dtype, self.loc.device, self.data_range)[k]


MODEL_SCALE = "model"
"""``scale=MODEL_SCALE``: the likelihood owns no scale; the model passes one to
each call (the diffusion chain's sigma_1 of p_theta(x_0|x_1))."""


class _ScaleLikelihood(nn.Module):
    """A likelihood with a location from the decoder and a scale that is learned
    per pixel (``scale=None``, softplus of a parameter plus ``min_scale``), fixed
    (a float), or given by the model at each call (``scale=MODEL_SCALE``)."""

    binary_data = False
    discrete = False
    default_min_scale = MIN_SCALE

    def __init__(self, x_dim: int | None = None, scale: float | str | None = None, min_scale: float | None = None):
        super().__init__()
        self.min_scale = self.default_min_scale if min_scale is None else min_scale
        self.mode = "learned" if scale is None else "model" if scale == MODEL_SCALE else "fixed"
        if self.mode == "fixed" and not (isinstance(scale, (int, float)) and scale > 0):
            raise ValueError(f"scale must be a number > 0, None (learned) or {MODEL_SCALE!r}, got {scale!r}")
        if self.mode == "learned":
            if x_dim is None or x_dim < 1:
                raise ValueError(f"a learned scale needs x_dim >= 1, got {x_dim!r}")
            self.raw_scale = nn.Parameter(torch.zeros(x_dim))
        elif self.mode == "fixed":
            self.register_buffer("raw_scale", torch.full((x_dim,), float(scale)))

    def forward(self, loc: torch.Tensor, scale: torch.Tensor | None = None) -> dist.Distribution:
        if (scale is None) != (self.mode != "model"):
            raise ValueError(
                f"scale must be given to this likelihood if and only if it was built with scale={MODEL_SCALE!r}; it has a {self.mode} scale"
            )
        if scale is None:
            scale = softplus(self.raw_scale) + self.min_scale if self.mode == "learned" else self.raw_scale
        return self.distribution(loc, scale).to_event(1)


class GaussianLikelihood(_ScaleLikelihood):
    """p_theta(x|z) = prod_d N(x_d; mu_d, sigma_d^2), mu from the decoder; a
    learned sigma is floored at ``min_scale`` (1e-2) because constant pixels
    would otherwise drive sigma, and the density, without bound."""

    default_min_scale = 1e-2

    def distribution(self, loc, scale):
        return dist.Normal(loc, scale)


class DiscretisedLogisticLikelihood(_ScaleLikelihood):
    """p_theta(x|z) = prod_d Discretised(x_d; mu_d, s_d) with a logistic CDF, mu
    from the decoder (on [-1, 1]); the data on ``data_range`` (default the
    pixels' [0, 1]; the diffusion chain's (-1, 1))."""

    discrete = True
    cdf = "logistic"

    def __init__(
        self,
        x_dim: int | None = None,
        scale: float | str | None = None,
        min_scale: float | None = None,
        data_range: tuple = (0.0, 1.0),
    ):
        super().__init__(x_dim, scale, min_scale)
        self.data_range = tuple(data_range)

    def distribution(self, loc, scale):
        return Discretised(loc, scale, self.cdf, self.data_range)


class DiscretisedGaussianLikelihood(DiscretisedLogisticLikelihood):
    """As :class:`DiscretisedLogisticLikelihood` with a Gaussian CDF (the DDPM decoder's)."""

    cdf = "normal"


class BinPosteriorLikelihood(_ScaleLikelihood):
    """p(x | z_0) = prod_d BinPosterior(x_d; u_d, s), VDM's decoder: the model
    passes the location u = z_0 / alpha_0 and the scale exp(gamma_0 / 2) to each
    call (``scale=MODEL_SCALE``); the data on ``data_range`` (VDM's [-1, 1])."""

    discrete = True

    def __init__(
        self,
        x_dim: int | None = None,
        scale: float | str | None = MODEL_SCALE,
        min_scale: float | None = None,
        data_range: tuple = (-1.0, 1.0),
    ):
        super().__init__(x_dim, scale, min_scale)
        self.data_range = tuple(data_range)

    def distribution(self, loc, scale):
        return BinPosterior(loc, scale, self.data_range)


class Registry(dict):
    """Names -> classes, whose lookups (``in``, ``[]``, ``get``) also accept the
    other spellings in ``aliases``; iterating, listing and ``--help`` show the
    canonical names only."""

    def __init__(self, entries: dict, aliases: dict):
        super().__init__(entries)
        self.aliases = dict(aliases)

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def __contains__(self, name) -> bool:
        return super().__contains__(self.canonical(name))

    def __getitem__(self, name):
        return super().__getitem__(self.canonical(name))

    def get(self, name, default=None):
        return super().get(self.canonical(name), default)


LIKELIHOODS = Registry(
    {
        "bernoulli": BernoulliLikelihood,
        "continuous-bernoulli": ContinuousBernoulliLikelihood,
        "gaussian": GaussianLikelihood,
        "discretised-logistic": DiscretisedLogisticLikelihood,
        "discretised-gaussian": DiscretisedGaussianLikelihood,
    },
    # the CLI's spelling before issue 13, and the diffusion chain's short name
    aliases={
        "discretised-logistic": "discretised-logistic",
        "discretized-gaussian": "discretised-gaussian",
        "discretised": "discretised-gaussian",
    },
)
"""Likelihood classes by name, each constructed as ``cls(x_dim)``."""
