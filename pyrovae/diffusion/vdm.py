"""Variational diffusion models (Kingma, Salimans, Poole & Ho 2021): diffusion
in continuous time with a learned noise schedule, as Pyro programs.

The model, in VDM's notation (data x on the 256 bin centres of [-1, 1],
latents z_t for t in [0, 1], gamma from :mod:`pyrovae.diffusion.gamma`)::

    q(z_t | x)          = N(alpha_t x, sigma_t^2 I),  sigma_t^2 = sigmoid(gamma_t), alpha_t^2 = sigmoid(-gamma_t)
    q(z_s | z_t, x)     = N(mu_Q(z_t, x; s, t), sigma_Q^2 I)   for s < t, with c = -expm1(gamma_s - gamma_t):
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
exp(gamma_0)) under a uniform prior on the 256 values (VDM's choice;
:class:`~pyrovae.parts.likelihoods.BinPosterior`, beside the chain's
discretised Gaussian in :mod:`pyrovae.parts.likelihoods`), and p(z_1) is the
:class:`~pyrovae.parts.priors.StandardNormalPrior` module, as the chain's p(x_T). The decoder has
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
from torch import nn

from pyrovae import params
from pyrovae.diffusion.base import DiffusionModel
from pyrovae.diffusion.denoisers import conditioned
from pyrovae.diffusion.gamma import GAMMA_MAX, GAMMA_MIN, GammaSchedule
from pyrovae.infer.bound import Bound
from pyrovae.parts.kl import normal_kl
from pyrovae.parts.likelihoods import BINS as NUM_BINS
from pyrovae.parts.likelihoods import MODEL_SCALE, BinPosterior, BinPosteriorLikelihood, bin_centres
from pyrovae.parts.priors import StandardNormalPrior

__all__ = ["VDM", "BinPosterior", "bin_centres", "fourier_features", "alpha_sigma_from_gamma", "NUM_BINS"]

FOURIER_EXPONENTS = (6, 7)  # VDM's code: sin, cos of 2^n 2 pi z for n = 6, 7


def alpha_sigma_from_gamma(gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma))."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


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


class VDM(DiffusionModel):
    """The continuous-time (``T=None``) or T-step variational diffusion model, a
    :class:`~pyrovae.diffusion.base.DiffusionModel` whose times are t in [0, 1].

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
        self.prior = StandardNormalPrior(x_dim)
        self.likelihood = BinPosteriorLikelihood(x_dim, scale=MODEL_SCALE)

    def reference(self) -> torch.Tensor:
        """gamma(0)'s parameter (every schedule has it; a denoiser may have no parameters)."""
        return self.gamma.gamma_min

    def _gamma_at(self, t) -> torch.Tensor:
        ref = self.reference()
        return self.gamma(torch.as_tensor(t, dtype=ref.dtype, device=ref.device))

    # --- the forward process, from gamma ---------------------------------------------

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) = (sqrt(sigmoid(-gamma(t))), sqrt(sigmoid(gamma(t)))), ``t``'s shape."""
        return alpha_sigma_from_gamma(self._gamma_at(t))

    def log_snr(self, t) -> torch.Tensor:
        """log(alpha_t^2 / sigma_t^2) = -gamma(t)."""
        return -self._gamma_at(t)

    def q_sample(self, x: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        """z_t = alpha_t x + sigma_t eps for times ``t`` in [0, 1] of the batch shape."""
        return self._q_sample(x, self._gamma_at(t), eps)

    def _q_sample(self, x: torch.Tensor, gamma_t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """:meth:`q_sample` at gamma_t (of the batch shape) instead of t."""
        alpha, sigma = alpha_sigma_from_gamma(gamma_t[..., None])
        return alpha * x + sigma * eps

    def predict_eps(self, z_t: torch.Tensor, t) -> torch.Tensor:
        """eps_hat(z_t; gamma(t)) (:meth:`eps_hat` at the time t)."""
        return self.eps_hat(z_t, self._gamma_at(t).to(z_t.dtype))

    def eps_hat(self, z_t: torch.Tensor, gamma_t: torch.Tensor) -> torch.Tensor:
        """eps_hat_theta(z_t; gamma_t), ``z_t``'s shape; any batch shape (one network call)."""
        batch_shape = z_t.shape[:-1]
        tau = (gamma_t.expand(batch_shape) - GAMMA_MIN) * (1000.0 / (GAMMA_MAX - GAMMA_MIN))
        inputs = fourier_features(z_t) if self.fourier else z_t
        out = self.net(inputs.reshape(-1, inputs.shape[-1]), tau.reshape(-1).to(z_t.dtype))
        return out[:, : self.x_dim].reshape(z_t.shape)

    def p_step(self, z_t: torch.Tensor, t, s=None) -> dist.Distribution:
        """p_theta(z_s | z_t) = N((alpha_s / alpha_t)(z_t - c sigma_t eps_hat), c sigma_s^2 I),
        c = -expm1(gamma_s - gamma_t), for times s < t in [0, 1], one step for the
        whole batch; ``s`` defaults to the T-step grid's t - 1/T."""
        if s is None:
            self._check_discrete()
            s = t - 1 / self.T
        return self._p_step(z_t, self._gamma_at(t), self._gamma_at(s))

    def _p_step(self, z_t: torch.Tensor, gamma_t: torch.Tensor, gamma_s: torch.Tensor) -> dist.Distribution:
        """:meth:`p_step` at (gamma_t, gamma_s), scalars, instead of (t, s)."""
        return self._posterior(z_t, self.eps_hat(z_t, gamma_t), gamma_t, gamma_s)

    def q_posterior(
        self, z_t: torch.Tensor, x: torch.Tensor, gamma_t: torch.Tensor, gamma_s: torch.Tensor
    ) -> dist.Distribution:
        """q(z_s | z_t, x): the same Gaussian as :meth:`p_step` with the true eps."""
        alpha_t, sigma_t = alpha_sigma_from_gamma(gamma_t)
        return self._posterior(z_t, (z_t - alpha_t * x) / sigma_t, gamma_t, gamma_s)

    def _posterior(self, z_t, eps, gamma_t, gamma_s) -> dist.Distribution:
        alpha_t, sigma_t = alpha_sigma_from_gamma(gamma_t)
        alpha_s, sigma_s = alpha_sigma_from_gamma(gamma_s)
        c = -torch.expm1(gamma_s - gamma_t)
        loc = (alpha_s / alpha_t) * (z_t - c * sigma_t * eps)
        return dist.Normal(loc, (c.sqrt() * sigma_s).expand_as(loc)).to_event(1)

    def p_decoder(self, z_0: torch.Tensor) -> dist.Distribution:
        """p(x | z_0): :class:`BinPosterior` of z_0 / alpha_0 with variance exp(gamma_0)
        (= sigma_0^2 / alpha_0^2, the noise of z_0 / alpha_0 around x)."""
        gamma_0 = self.gamma(z_0.new_zeros(()))
        alpha_0, _ = alpha_sigma_from_gamma(gamma_0)
        return self.likelihood(z_0 / alpha_0, (0.5 * gamma_0).exp())

    def q_top(self, x: torch.Tensor) -> dist.Distribution:
        """q(z_1 | x) = N(alpha_1 x, sigma_1^2 I)."""
        alpha, sigma = alpha_sigma_from_gamma(self.gamma(x.new_ones(())))
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
            z = pyro.sample(f"z_{self.T}", self.prior())
            for i in range(self.T, 0, -1):
                z = pyro.sample(f"z_{i - 1}", vdm._p_step(z, gammas[i], gammas[i - 1]))
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
        """``kl_top`` = KL(q(z_1|x) || N(0, I)) = 1/2 sum_D (sigma_1^2 + alpha_1^2 x^2 - 1 - log sigma_1^2)
        (:func:`~pyrovae.parts.kl.normal_kl`; sigma_1 one number), shape ``(B,)``."""
        gamma_1 = self.gamma(x.new_ones(()))
        alpha_1, _ = alpha_sigma_from_gamma(gamma_1)
        return normal_kl(x, torch.nn.functional.logsigmoid(gamma_1), None, self.x_dim, mean_scale=alpha_1)

    def recon(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """``recon`` = log p(x | z_0) at one z_0 ~ q(z_0|x), shape ``(B,)``."""
        gamma_0 = self.gamma(x.new_zeros(()))
        eps = torch.randn_like(x) if eps is None else eps
        return self.p_decoder(self._q_sample(x, gamma_0.expand(x.shape[:-1]), eps)).log_prob(x)

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
        z_t = self._q_sample(x, gamma_t, eps)
        return 0.5 * weight * (eps - self.eps_hat(z_t, gamma_t)).square().sum(-1)

    def bound(self, x: torch.Tensor, draws: int = 1, y: torch.Tensor | None = None) -> Bound:
        """The bound's named terms per example (:class:`~pyrovae.infer.bound.Bound`):
        an unbiased estimate with ``draws`` antithetic draws of t per example and
        one z_0 (:meth:`VDMELBO.bound_terms <pyrovae.infer.vdm_elbo.VDMELBO.bound_terms>`)."""
        from pyrovae.infer.vdm_elbo import VDMELBO

        return VDMELBO(num_particles=draws).bound_terms(self, x, y)

    # --- sampling ---------------------------------------------------------------------

    @torch.no_grad()
    def sampler_view(self):
        """The samplers' view of this model (:class:`~pyrovae.diffusion.samplers.VDMView`)."""
        from pyrovae.diffusion.samplers import VDMView  # the samplers import the models

        return VDMView(self)

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
        ref = self.reference()
        z = torch.randn(n, self.x_dim, dtype=ref.dtype, device=ref.device)
        gammas = self._grid(steps, z)
        for i in range(steps, 0, -1):
            step = self._p_step(z, gammas[i], gammas[i - 1]).base_dist
            z = step.loc + step.scale * torch.randn_like(z)
        return self.p_decoder(z).sample()
