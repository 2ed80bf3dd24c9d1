"""The noise schedule: the single owner of every number derived from beta_t.

The forward process (the diffusion model's fixed encoder) is ::

    q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I),   alpha_t = 1 - beta_t,   t = 1..T

with the closed forms ::

    q(x_t | x_0)          = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),   alpha_bar_t = prod_{s<=t} alpha_s
    q(x_{t-1} | x_t, x_0) = N(mu_tilde_t(x_t, x_0), beta_tilde_t I)
        mu_tilde_t   = posterior_mean_coef1_t x_0 + posterior_mean_coef2_t x_t
        coef1_t      = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)
        coef2_t      = sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
        beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t          (alpha_bar_0 = 1)

Times are 1-based as in the papers: ``t`` is an integer tensor with values in
``1..T`` whose shape is the batch shape of ``x`` (or broadcasts to it); data
``x`` have shape ``batch_shape + (D,)`` and every distribution returned has
event shape ``(D,)``. Tables are stored in float64 (as improved-diffusion
does) and cast to ``x``'s dtype when read; 1 - alpha_bar_t is its own table,
formed in float64 as -expm1(sum_{s<=t} log1p(-beta_s)) before any cast, so
that betas as small as 1e-12 keep a finite bound in float32.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyrovae.registry import lookup

SCHEDULES = ("linear", "cosine")
MAX_BETA = 0.999


def linear_betas(T: int) -> torch.Tensor:
    """Ho et al. (2020): beta from 1e-4 to 0.02 linearly at T = 1000; for other T
    both ends are scaled by 1000/T (improved-diffusion), so alpha_bar_T stays
    near 0. For T < 50 the scaled end exceeds 1, so betas are capped at 0.999
    as the cosine schedule's are."""
    _check_T(T)
    scale = 1000.0 / T
    return torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64).clamp(max=MAX_BETA)


def cosine_betas(T: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal (2021): alpha_bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
    beta_t = 1 - alpha_bar(t)/alpha_bar(t-1), capped at 0.999."""
    _check_T(T)
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)


def _check_T(T) -> None:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T (number of diffusion steps) must be an integer >= 1, got {T!r}")


class NoiseSchedule(nn.Module):
    """beta_1..beta_T and everything derived from them, precomputed once as
    buffers (so ``.to(device)`` moves them).

    :param betas: 1-D tensor (or sequence) of T >= 1 values in the open interval (0, 1).
    :param timesteps: for a respaced schedule (:meth:`respace`), the original time
        each step stands for (what the denoiser is told); default ``1..T``.
    :param original_T: the number of steps of the schedule ``timesteps`` index
        (the denoiser's time scale); required with ``timesteps``, else T.
    """

    def __init__(self, betas, timesteps=None, original_T: int | None = None):
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu()
        if betas.dim() != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a 1-D tensor with T >= 1 entries, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all():
            raise ValueError(f"betas must be finite, got {betas.tolist()[:10]}...")
        if not ((betas > 0) & (betas < 1)).all():
            bad = betas[(betas <= 0) | (betas >= 1)]
            raise ValueError(f"betas must lie in the open interval (0, 1), got values {bad.tolist()[:5]}")
        T = betas.numel()
        if (timesteps is None) != (original_T is None):
            raise ValueError(
                f"timesteps and original_T must be given together (a respaced schedule), got timesteps={timesteps!r}, original_T={original_T!r}"
            )
        timesteps = torch.arange(1, T + 1) if timesteps is None else torch.as_tensor(timesteps, dtype=torch.long)
        if timesteps.shape != (T,):
            raise ValueError(f"timesteps must have shape ({T},) like betas, got {tuple(timesteps.shape)}")
        self.original_T = T if original_T is None else int(original_T)
        if timesteps.min() < 1 or timesteps.max() > self.original_T:
            raise ValueError(f"timesteps must lie in 1..original_T = {self.original_T}, got {timesteps.tolist()[:10]}")
        alphas = 1 - betas
        log_alphas_cumprod = torch.cumsum(torch.log1p(-betas), 0)
        alphas_cumprod = log_alphas_cumprod.exp()
        # 1 - alpha_bar without cancellation: 1 - (1 - 1e-12) would keep 4 digits
        one_minus_alphas_cumprod = -torch.expm1(log_alphas_cumprod)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        one_minus_alphas_cumprod_prev = torch.cat([alphas_cumprod.new_zeros(1), one_minus_alphas_cumprod[:-1]])
        posterior_variance = betas * one_minus_alphas_cumprod_prev / one_minus_alphas_cumprod
        # beta_tilde_1 = 0 (x_0 is known given x_0); its log is clipped to
        # beta_tilde_2 so that a learned or "small" variance at t = 1 stays finite.
        clip_to = posterior_variance[1] if T > 1 else betas[0]
        tables = {
            "timesteps": timesteps,
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "one_minus_alphas_cumprod": one_minus_alphas_cumprod,
            "sqrt_alphas": alphas.sqrt(),
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": one_minus_alphas_cumprod.sqrt(),
            "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (one_minus_alphas_cumprod / alphas_cumprod).sqrt(),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": torch.cat([clip_to.reshape(1), posterior_variance[1:]]).log(),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / one_minus_alphas_cumprod,
            "posterior_mean_coef2": one_minus_alphas_cumprod_prev * alphas.sqrt() / one_minus_alphas_cumprod,
        }
        for name, value in tables.items():
            self.register_buffer(name, value)

    @classmethod
    def from_name(cls, name: str, T: int) -> NoiseSchedule:
        """``linear`` (:func:`linear_betas`) or ``cosine`` (:func:`cosine_betas`) with T steps."""
        if name == "linear":
            return cls(linear_betas(T))
        if name == "cosine":
            return cls(cosine_betas(T))
        lookup("schedule", name, SCHEDULES)

    @property
    def T(self) -> int:
        return self.betas.numel()

    def time_index(self, t):
        """``t - 1``, the index of time t in the tables, after the library's one
        check of a time: t an int or an integer tensor, in 1..T (a tensor's
        range only under ``pyro.enable_validation()``, Pyro's default: the check
        reads t back from the device)."""
        if type(t) is int:
            # one time for the whole batch (the sampler's loop, the literal chain): checked in Python
            if not 1 <= t <= self.T:
                raise ValueError(f"t must lie in 1..{self.T}, got {t}")
            return t - 1
        t = torch.as_tensor(t, device=self.betas.device)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must be an integer tensor of times in 1..{self.T}, got dtype {t.dtype}")
        if is_validation_enabled() and t.numel() and (t.min() < 1 or t.max() > self.T):
            raise ValueError(f"t must lie in 1..{self.T}, got values from {int(t.min())} to {int(t.max())}")
        return t - 1

    def extract(self, table: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
        """``table[t - 1]`` in ``x``'s dtype with a trailing event dimension, so it
        broadcasts against ``x`` of shape ``batch_shape + (D,)`` (t checked by
        :meth:`time_index`)."""
        i = self.time_index(t)
        if type(i) is int:
            return table[i : i + 1].to(dtype=x.dtype)  # no index tensor built for one time
        return table[i].to(dtype=x.dtype).unsqueeze(-1)

    # q(x_t | x_{t-1}): the forward step, used by the forward-factorised guide.
    def q_step(self, x_prev: torch.Tensor, t) -> dist.Distribution:
        """q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t I)."""
        loc = self.extract(self.sqrt_alphas, t, x_prev) * x_prev
        scale = self.extract(self.betas, t, x_prev).sqrt().expand_as(loc)
        return dist.Normal(loc, scale).to_event(1)

    def q_mean_variance(self, x0: torch.Tensor, t):
        """Mean sqrt(alpha_bar_t) x_0 and variance 1 - alpha_bar_t of q(x_t | x_0)."""
        mean = self.extract(self.sqrt_alphas_cumprod, t, x0) * x0
        variance = self.extract(self.one_minus_alphas_cumprod, t, x0).expand_as(mean)
        return mean, variance

    def q_xt_given_x0(self, x0: torch.Tensor, t) -> dist.Distribution:
        """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)."""
        mean, variance = self.q_mean_variance(x0, t)
        return dist.Normal(mean, variance.sqrt()).to_event(1)

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, eps ~ N(0, I):
        a reparameterised draw from q(x_t | x_0)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(self, x_t: torch.Tensor, x0: torch.Tensor, t):
        """Mean mu_tilde_t(x_t, x_0), variance beta_tilde_t and clipped log-variance
        of q(x_{t-1} | x_t, x_0)."""
        mean = (
            self.extract(self.posterior_mean_coef1, t, x_t) * x0 + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self.extract(self.posterior_variance, t, x_t).expand_as(mean)
        log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t).expand_as(mean)
        return mean, variance, log_variance

    def q_posterior(self, x_t: torch.Tensor, x0: torch.Tensor, t) -> dist.Distribution:
        """q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I), for t >= 2 (at t = 1
        it is a point mass at x_0, which has no density)."""
        t_ = torch.as_tensor(t)
        if t_.numel() and t_.min() < 2:
            raise ValueError("q_posterior needs t >= 2: q(x_0 | x_1, x_0) is a point mass at x_0")
        mean, variance, _ = self.q_posterior_mean_variance(x_t, x0, t)
        return dist.Normal(mean, variance.sqrt()).to_event(1)

    def respace(self, steps: int) -> NoiseSchedule:
        """A schedule on ``steps`` evenly spaced times tau_1 < ... < tau_K = T of this
        one (always ending at T, so that x_{tau_K} ~ N(0, I) is the right start;
        one step is tau_1 = T) with recomputed betas,
        beta_k = 1 - alpha_bar_{tau_k} / alpha_bar_{tau_{k-1}} (improved DDPM's
        respacing), so that q(x_{tau_k} | x_0) is that of the original chain.
        Its ``timesteps`` buffer holds the original tau_k the denoiser is told,
        and ``original_T`` the original chain's T (the denoiser's time scale)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.T:
            raise ValueError(f"steps must be an integer in 1..{self.T}, got {steps!r}")
        first = 0 if steps > 1 else self.T - 1
        idx = torch.linspace(first, self.T - 1, steps, dtype=torch.float64).round().long().unique()
        log_ab = torch.cumsum(torch.log1p(-self.betas.detach().cpu()), 0)[idx]
        log_ratio = log_ab - torch.cat([log_ab.new_zeros(1), log_ab[:-1]])
        # beta_k < 1 exactly, unless alpha_bar's ratio underflows double precision
        betas = (-torch.expm1(log_ratio)).clamp(
            max=torch.nextafter(torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
        )
        respaced = NoiseSchedule(betas, self.timesteps.cpu()[idx], self.original_T)
        return respaced.to(self.betas.device)
