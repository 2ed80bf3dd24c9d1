"""Variational diffusion models (Kingma, Salimans, Poole & Ho 2021): diffusion
in continuous time with a learned noise schedule, as Pyro programs.

The model, in VDM's notation (data x on the 256 bin centres of [-1, 1],
latents z_t for t in [0, 1], gamma from :mod:`pyrovae.diffusion.gamma`)::

    q(z_t | x)          = N(alpha_t x, sigma_t^2 I),  sigma_t^2 = sigmoid(gamma_t), alpha_t^2 = sigmoid(-gamma_t)
    q(z_s | z_t, x)     = N(mu_Q(z_t, x; s, t), sigma_Q^2 I)                 for s < t, with c = -expm1(gamma_s - gamma_t):
        mu_Q            = (alpha_s / alpha_t) (z_t - c sigma_t eps),  eps = (z_t - alpha_t x) / sigma_t
        sigma_Q^2       = c sigma_s^2
    p_theta(z_s | z_t)  = q(z_s | z_t, x = x_hat_theta(z_t; t)),  x_hat = (z_t - sigma_t eps_hat) / alpha_t
    p(z_1)              = N(0, I)
    p(x | z_0)          = prod_pixels Categorical over the 256 bins x_k with logits
                          -1/2 exp(-gamma_0) (z_0 / alpha_0 - x_k)^2

where eps_hat = eps_hat_theta(z_t; gamma_t) is the denoiser, conditioned on
gamma_t (not on t, so that the bound's invariance to the schedule's interior
holds). Its bound, in the project's vocabulary (:mod:`pyrovae.infer.bound`;
``kl_layers`` is the sum of the T-step chain's KL terms, and its limit, the
integral L_inf, in continuous time), is ::

    ELBO(x) = E_{q(z_0|x)}[log p(x | z_0)]            ``recon``
            - KL(q(z_1|x) || N(0, I))                 ``kl_top``
            - L_diffusion                             ``kl_layers``

    continuous time:  L_inf = 1/2 E_{t ~ U(0, 1), eps}[gamma'(t) ||eps - eps_hat(z_t; gamma_t)||^2]
    T steps:          L_T   = sum_{i=1..T} E_{q(z_{t_i}|x)} KL(q(z_{s_i}|z_{t_i}, x) || p_theta(z_{s_i}|z_{t_i}))
                            = T/2 E_{i ~ U{1..T}, eps}[expm1(gamma_{t_i} - gamma_{s_i}) ||eps - eps_hat||^2],
                      t_i = i / T, s_i = (i - 1) / T.

The decoder is the Bayes posterior over the bins of z_0 / alpha_0 ~ N(x_k,
exp(gamma_0)) under a uniform prior on the 256 values (VDM's choice): it has
no parameters but gamma_0, is a probability mass function (so the bound is on
the discrete data's log-probability and converts to bits/dim), and tends to
the point mass at x as gamma_0 -> -inf, with no special edge bins.

Shapes: data ``x`` flat, ``(B, D)``; every z_t has the same shape; the batch
is ``pyro.plate("data", B)`` and every site has event shape ``(D,)``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyrovae import params
from pyrovae.checks import check_finite
from pyrovae.diffusion.denoisers import conditioned
from pyrovae.diffusion.gamma import GAMMA_MAX, GAMMA_MIN, GammaSchedule
from pyrovae.nets import first_parameter

NUM_BINS = 256
FOURIER_EXPONENTS = (6, 7)  # VDM's code: sin, cos of 2^n 2 pi z for n = 6, 7


def bin_centres(dtype=torch.float32, device=None) -> torch.Tensor:
    """The 256 values x_k = 2 k / 255 - 1 of 8-bit pixels in [-1, 1]."""
    # k / 127.5 - 1, exactly as the data are scaled (to_chain_space), so values match bins bit for bit
    return torch.arange(NUM_BINS, dtype=dtype, device=device) / ((NUM_BINS - 1) / 2) - 1.0


class BinPosterior(TorchDistribution):
    """p(x | z_0) per pixel: the posterior over the 256 bin centres x_k of
    u = z_0 / alpha_0 ~ N(x_k, v) under a uniform prior on k,

        p(x_k | u) = exp(-(u - x_k)^2 / (2 v)) / sum_j exp(-(u - x_j)^2 / (2 v)),

    with v = exp(gamma_0) (VDM's logits form). ``loc`` is u, ``scale`` is
    sqrt(v) (broadcast to ``loc``); values are bin centres.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.interval(-1.0, 1.0)

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(BinPosterior, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.scale = self.loc.expand(batch_shape), self.scale.expand(batch_shape)
        super(BinPosterior, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def logits(self) -> torch.Tensor:
        """Normalised log-probabilities of the 256 bins, shape ``batch_shape + (256,)``."""
        x_k = bin_centres(self.loc.dtype, self.loc.device)
        logits = -0.5 * ((self.loc[..., None] - x_k) / self.scale[..., None]).square()
        return logits - logits.logsumexp(-1, keepdim=True)

    def log_normaliser(self) -> torch.Tensor:
        """log sum_k exp(-(u - x_k)^2 / (2 v)), ``batch_shape``, summed over the
        bins within 12 sqrt(v) + 1 bin of the bin nearest u only: every bin left
        out is at least 12 standard deviations further than that bin, so the
        mass left out is below 256 e^{-72} ~ 1e-29 of the sum (exact in float32
        and float64). At VDM's gamma_0 = -13.3 this is 7 bins instead of 256."""
        half_width = 2.0 / (NUM_BINS - 1)
        window = min(NUM_BINS - 1, math.ceil(12 * float(self.scale.detach().max()) / half_width) + 1)
        nearest = ((self.loc.detach() + 1) * ((NUM_BINS - 1) / 2)).round().clamp(0, NUM_BINS - 1)
        index = nearest[..., None] + torch.arange(-window, window + 1, dtype=self.loc.dtype, device=self.loc.device)
        x_k = index / ((NUM_BINS - 1) / 2) - 1.0
        logits = -0.5 * ((self.loc[..., None] - x_k) / self.scale[..., None]).square()
        return logits.masked_fill((index < 0) | (index > NUM_BINS - 1), -math.inf).logsumexp(-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        x_k = ((value.clamp(-1, 1) + 1) * ((NUM_BINS - 1) / 2)).round() / ((NUM_BINS - 1) / 2) - 1.0  # the value's bin
        return -0.5 * ((self.loc - x_k) / self.scale).square() - self.log_normaliser()

    @property
    def mean(self) -> torch.Tensor:
        return (self.logits().exp() * bin_centres(self.loc.dtype, self.loc.device)).sum(-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            logits = self.logits().expand(self._extended_shape(sample_shape) + (NUM_BINS,))
            return bin_centres(self.loc.dtype, self.loc.device)[torch.distributions.Categorical(logits=logits).sample()]


def fourier_features(z: torch.Tensor) -> torch.Tensor:
    """``[z, sin(2^n 2 pi z), cos(2^n 2 pi z)]`` for n in :data:`FOURIER_EXPONENTS`,
    blocks of D concatenated along the last axis: ``(..., D) -> (..., 5 D)``.
    Fine-scale features of z_t near t = 0 that help the denoiser resolve the
    bins (VDM's appendix)."""
    feats = [z]
    for n in FOURIER_EXPONENTS:
        arg = (2.0**n * 2 * math.pi) * z
        feats += [torch.sin(arg), torch.cos(arg)]
    return torch.cat(feats, -1)


class VDM(nn.Module):
    """The continuous-time (``T=None``) or T-step variational diffusion model.

    :param net: denoiser ``(z (N, k D), tau (N,)) -> (N, >= D)`` from
        :mod:`pyrovae.diffusion.denoisers`, with k = 5 when ``fourier`` (its
        input is :func:`fourier_features` of z_t) else 1; only the first D
        outputs are read (eps_hat). tau is gamma_t rescaled to 0..1000 on the
        fixed reference range [-13.3, 5] (not the schedule's own end points,
        which are learned: the denoiser must be a function of gamma alone).
    :param gamma: the :class:`~pyrovae.diffusion.gamma.GammaSchedule`.
    :param x_dim: D, the size of one flattened example.
    :param T: ``None`` for the continuous-time model (bound L_inf), or the
        number of steps of the discrete model (bound L_T, with a literal Pyro
        model/guide pair).
    :param fourier: feed Fourier features of z_t to the denoiser.

    The T-step model's sites, and their map to :class:`DiffusionChain`'s
    (the seed's chain): here ``"z_i"`` is z at time t = i / T, i = T..0, and
    the data site is ``"x"``::

        VDM, T steps         z_T ~ N(0, I)  ->  z_{T-1} .. z_0 (T KL terms)  ->  x ~ p(x | z_0)
        seed's chain, T + 1  x_{T+1} ~ N(0, I) -> x_T .. x_1 (T KL terms)    ->  x_0 ~ p(x_0 | x_1)

    so VDM's z_i is the seed's x_{i+1}, VDM's KL at step i (z_{i-1} given z_i)
    is the seed's L_i = KL(q(x_i | x_{i+1}, x_0) || p(x_i | x_{i+1})), and
    both decoders sit at the least noisy latent. A seed chain of T steps has
    T - 1 KL terms; VDM's T-step model has T, because its z_0 is still noisy
    (sigma_0^2 = sigmoid(gamma_min) > 0) where the seed's x_0 is the data.
    """

    def __init__(self, net: nn.Module, gamma: GammaSchedule, x_dim: int, T: int | None = None, fourier: bool = False):
        super().__init__()
        if not isinstance(gamma, GammaSchedule):
            raise TypeError(f"gamma must be a GammaSchedule, got {type(gamma).__name__}")
        if isinstance(x_dim, bool) or not isinstance(x_dim, int) or x_dim < 1:
            raise ValueError(f"x_dim must be an integer >= 1, got {x_dim!r}")
        if T is not None and (isinstance(T, bool) or not isinstance(T, int) or T < 1):
            raise ValueError(f"T must be None (continuous time) or an integer >= 1, got {T!r}")
        self.net, self.gamma, self.x_dim, self.T, self.fourier = net, gamma, x_dim, T, fourier

    def check_data(self, x: torch.Tensor) -> torch.Tensor:
        """Raise a clear error for data this model cannot score; return ``x`` in
        the model's floating dtype (float64 or half-precision data are cast, as the chain's)."""
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"x must be a float tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
        if x.dim() != 2 or x.shape[1] != self.x_dim or x.shape[0] == 0:
            raise ValueError(f"x must have shape (batch >= 1, {self.x_dim}), got {tuple(x.shape)}")
        param = first_parameter(self)
        if param is not None:  # a model without parameters (a fixed schedule, an exact denoiser) keeps x's dtype
            x = x.to(param.dtype)
        if is_validation_enabled():
            check_finite(x, "x")
            if x.min() < -1 or x.max() > 1:
                raise ValueError(
                    f"x must be 8-bit pixels scaled to [-1, 1], got values in [{x.min():.3g}, {x.max():.3g}]"
                )
        return x

    # --- the forward process, from gamma ---------------------------------------------

    @staticmethod
    def alpha_sigma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma))."""
        return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()

    def q_sample(self, x: torch.Tensor, gamma_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """z_t = alpha_t x + sigma_t eps; ``gamma_t`` of the batch shape."""
        alpha, sigma = self.alpha_sigma(gamma_t[..., None])
        return alpha * x + sigma * eps

    def eps_hat(self, z_t: torch.Tensor, gamma_t: torch.Tensor) -> torch.Tensor:
        """eps_hat_theta(z_t; gamma_t), ``z_t``'s shape; any batch shape (one network call)."""
        batch_shape = z_t.shape[:-1]
        tau = (gamma_t.expand(batch_shape) - GAMMA_MIN) * (1000.0 / (GAMMA_MAX - GAMMA_MIN))
        inputs = fourier_features(z_t) if self.fourier else z_t
        out = self.net(inputs.reshape(-1, inputs.shape[-1]), tau.reshape(-1).to(z_t.dtype))
        return out[:, : self.x_dim].reshape(z_t.shape)

    def p_step(self, z_t: torch.Tensor, gamma_t: torch.Tensor, gamma_s: torch.Tensor) -> dist.Distribution:
        """p_theta(z_s | z_t) = N((alpha_s / alpha_t)(z_t - c sigma_t eps_hat), c sigma_s^2 I),
        c = -expm1(gamma_s - gamma_t), for s < t (any grid); ``gamma_t``, ``gamma_s``
        scalars (one step for the whole batch)."""
        return self._posterior(z_t, self.eps_hat(z_t, gamma_t), gamma_t, gamma_s)

    def q_posterior(
        self, z_t: torch.Tensor, x: torch.Tensor, gamma_t: torch.Tensor, gamma_s: torch.Tensor
    ) -> dist.Distribution:
        """q(z_s | z_t, x): the same Gaussian as :meth:`p_step` with the true eps."""
        alpha_t, sigma_t = self.alpha_sigma(gamma_t)
        return self._posterior(z_t, (z_t - alpha_t * x) / sigma_t, gamma_t, gamma_s)

    def _posterior(self, z_t, eps, gamma_t, gamma_s) -> dist.Distribution:
        alpha_t, sigma_t = self.alpha_sigma(gamma_t)
        alpha_s, sigma_s = self.alpha_sigma(gamma_s)
        c = -torch.expm1(gamma_s - gamma_t)
        loc = (alpha_s / alpha_t) * (z_t - c * sigma_t * eps)
        return dist.Normal(loc, (c.sqrt() * sigma_s).expand_as(loc)).to_event(1)

    def p_decoder(self, z_0: torch.Tensor) -> dist.Distribution:
        """p(x | z_0): :class:`BinPosterior` of z_0 / alpha_0 with variance exp(gamma_0)
        (= sigma_0^2 / alpha_0^2, the noise of z_0 / alpha_0 around x)."""
        gamma_0 = self.gamma(z_0.new_zeros(()))
        alpha_0, _ = self.alpha_sigma(gamma_0)
        return BinPosterior(z_0 / alpha_0, (0.5 * gamma_0).exp()).to_event(1)

    @staticmethod
    def p_prior(x: torch.Tensor) -> dist.Distribution:
        """p(z_1) = N(0, I), shaped like ``x``."""
        return dist.Normal(torch.zeros_like(x), torch.ones_like(x)).to_event(1)

    def q_top(self, x: torch.Tensor) -> dist.Distribution:
        """q(z_1 | x) = N(alpha_1 x, sigma_1^2 I)."""
        alpha, sigma = self.alpha_sigma(self.gamma(x.new_ones(())))
        return dist.Normal(alpha * x, sigma.expand_as(x)).to_event(1)

    # --- the literal T-step chain -------------------------------------------------------

    def _grid(self, steps: int, ref: torch.Tensor) -> torch.Tensor:
        """gamma at t_i = i / steps, i = 0..steps, shape ``(steps + 1,)``."""
        return self.gamma(torch.arange(steps + 1, dtype=ref.dtype, device=ref.device) / steps)

    def _check_discrete(self) -> None:
        if self.T is None:
            raise ValueError(
                "the continuous-time model (T=None) has no literal chain; build VDM(..., T=k) or use VDMELBO"
            )

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """p(z_1) prod_{i=T..1} p_theta(z_{(i-1)/T} | z_{i/T}) p(x | z_0): sites
        ``"z_T"``, ..., ``"z_0"`` and the observed ``"x"``; with ``y`` (a
        conditional denoiser) each step's eps_hat is the denoiser's at y."""
        self._check_discrete()
        params.module(self, "vdm")  # a name of its own in the param store
        x = self.check_data(x)
        gammas = self._grid(self.T, x)
        vdm = self if y is None else conditioned(self, y)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(f"z_{self.T}", self.p_prior(x))
            for i in range(self.T, 0, -1):
                z = pyro.sample(f"z_{i - 1}", vdm.p_step(z, gammas[i], gammas[i - 1]))
            pyro.sample("x", self.p_decoder(z), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """q(z_1 | x) prod_{i=T..1} q(z_{(i-1)/T} | z_{i/T}, x): the fixed encoder
        in the model's order, so each site's KL given its parent is exact (``y``
        changes nothing)."""
        self._check_discrete()
        params.module(self, "vdm")
        x = self.check_data(x)
        gammas = self._grid(self.T, x)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(f"z_{self.T}", self.q_top(x))
            for i in range(self.T, 0, -1):
                z = pyro.sample(f"z_{i - 1}", self.q_posterior(z, x, gammas[i], gammas[i - 1]))

    # --- the bound's terms ---------------------------------------------------------------

    def prior_kl(self, x: torch.Tensor) -> torch.Tensor:
        """``kl_top`` = KL(q(z_1|x) || N(0, I)) = 1/2 sum_D (sigma_1^2 + alpha_1^2 x^2 - 1 - log sigma_1^2), shape ``(B,)``."""
        gamma_1 = self.gamma(x.new_ones(()))
        var_1 = torch.sigmoid(gamma_1)
        return 0.5 * (var_1 + torch.sigmoid(-gamma_1) * x.square() - 1 - torch.nn.functional.logsigmoid(gamma_1)).sum(
            -1
        )

    def recon(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """``recon`` = log p(x | z_0) at one z_0 ~ q(z_0|x), shape ``(B,)``."""
        gamma_0 = self.gamma(x.new_zeros(()))
        eps = torch.randn_like(x) if eps is None else eps
        return self.p_decoder(self.q_sample(x, gamma_0.expand(x.shape[:-1]), eps)).log_prob(x)

    def diffusion_weight(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma at the time used, the diffusion term's weight w) for times
        ``t`` in [0, 1] (any shape)::

            continuous:  gamma(t),   w = gamma'(t)
            T steps:     gamma(t_i), w = T expm1(gamma(t_i) - gamma(s_i)),
                         t_i = ceil(T t) / T, s_i = t_i - 1/T

        (t ~ U(0, 1) lands on step i with probability 1/T). The only way the
        diffusion term depends on the schedule, so an objective can route the
        schedule's gradient through these two tensors.
        """
        if self.T is None:
            return self.gamma.gamma_and_derivative(t)
        i = (t * self.T).ceil().clamp(1, self.T)
        gamma_t = self.gamma(i / self.T)
        return gamma_t, self.T * torch.expm1(gamma_t - self.gamma((i - 1) / self.T))

    def diffusion_loss(
        self, x: torch.Tensor, gamma_t: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The integrand of the diffusion term, summed over D,

            1/2 w ||eps - eps_hat(z_t; gamma_t)||^2,   z_t = alpha_t x + sigma_t eps,

        with (gamma_t, w) from :meth:`diffusion_weight` of shape ``batch_shape``
        (``x`` broadcasts to ``batch_shape + (D,)``); returns ``batch_shape``.
        For t ~ U(0, 1) it is an unbiased one-draw estimate of L_inf (continuous
        time) or L_T (T steps).
        """
        eps = torch.randn(gamma_t.shape + x.shape[-1:], dtype=x.dtype, device=x.device) if eps is None else eps
        z_t = self.q_sample(x, gamma_t, eps)
        return 0.5 * weight * (eps - self.eps_hat(z_t, gamma_t)).square().sum(-1)

    # --- sampling ---------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self, n: int, steps: int | None = None, y: torch.Tensor | None = None, guidance: float | None = None
    ) -> torch.Tensor:
        """Ancestral sampling on the grid t_i = i / steps: z_1 ~ N(0, I),
        z_{(i-1)/steps} ~ p_theta(z_{(i-1)/steps} | z_{i/steps}) for i = steps..1,
        then x ~ p(x | z_0); returns ``(n, D)`` images in [-1, 1].

        :param steps: grid size (default: T, or 1000 for the continuous model).
        :param y: ``n`` conditioning inputs (a conditional denoiser): draws of p(x | y).
        :param guidance: classifier-free guidance's weight w >= 0
            (:class:`~pyrovae.diffusion.denoisers.Conditioned`); with w > 0 the
            draws are *not* from the model's p(x | y).
        """
        if y is not None or guidance is not None:
            if y is None:
                raise ValueError("guidance needs y, the classes (or inputs) to guide towards")
            return conditioned(self, y, guidance).sample(n, steps)
        steps = steps if steps is not None else (self.T or 1000)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        ref = self.gamma.gamma_min  # every schedule has it; a denoiser may have no parameters
        z = torch.randn(n, self.x_dim, dtype=ref.dtype, device=ref.device)
        gammas = self._grid(steps, z)
        for i in range(steps, 0, -1):
            step = self.p_step(z, gammas[i], gammas[i - 1]).base_dist
            z = step.loc + step.scale * torch.randn_like(z)
        return self.p_decoder(z).sample()
