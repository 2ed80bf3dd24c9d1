"""Diffusion of Gaussian data x_0 ~ N(mu, Sigma), where everything is known in closed form:

    q(x_t) = N(alpha_t mu, Cov_t),   Cov_t = alpha_t^2 Sigma + sigma_t^2 I,
    eps*(x_t, t) = sigma_t Cov_t^{-1} (x_t - alpha_t mu)              (the exact eps-predictor),
    probability-flow ODE from s to t:  x_t = alpha_t mu + Cov_t^{1/2} Cov_s^{-1/2} (x_s - alpha_s mu)

(the Cov_t commute, all being diagonal in Sigma's eigenbasis). Shared by the
sampler and ODE tests: a view with VDM's continuous time (:class:`GaussianVP`)
and a denoiser network that plugs the exact eps into a real chain or VDM.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pyrovae.diffusion.gamma import GAMMA_MAX, GAMMA_MIN

MU = torch.tensor([0.3, -0.5], dtype=torch.float64)
SIGMA = torch.tensor([[0.09, 0.03], [0.03, 0.04]], dtype=torch.float64)


def exact_eps(x, alpha, sigma, mu=MU, Sigma=SIGMA):
    """eps*(x_t, t) for ``x`` of shape (N, D), alpha and sigma scalars or (N, 1)."""
    alpha, sigma = torch.as_tensor(alpha, dtype=x.dtype), torch.as_tensor(sigma, dtype=x.dtype)
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    a, s = alpha.reshape(-1, 1, 1), sigma.reshape(-1, 1, 1)
    cov = a**2 * Sigma.to(x.dtype) + s**2 * eye
    r = x - alpha.reshape(-1, 1) * mu.to(x.dtype)
    return sigma.reshape(-1, 1) * torch.linalg.solve(cov, r.unsqueeze(-1)).squeeze(-1)


def _sqrtm(m):
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag(vals.sqrt()) @ vecs.T


def exact_flow(x, alpha_s, sigma_s, alpha_t, sigma_t, mu=MU, Sigma=SIGMA):
    """The probability-flow ODE's map from x_s to x_t, for the Gaussian data."""
    eye = torch.eye(len(mu), dtype=torch.float64)
    cov_s, cov_t = alpha_s**2 * Sigma + sigma_s**2 * eye, alpha_t**2 * Sigma + sigma_t**2 * eye
    m = _sqrtm(cov_t) @ torch.linalg.inv(_sqrtm(cov_s))
    return alpha_t * mu + (x.double() - alpha_s * mu) @ m.T


def log_density(x, alpha, sigma, mu=MU, Sigma=SIGMA):
    """log N(x; alpha mu, Cov_t)."""
    cov = alpha**2 * Sigma + sigma**2 * torch.eye(len(mu), dtype=torch.float64)
    return torch.distributions.MultivariateNormal(alpha * mu, cov).log_prob(x.double())


class GaussianVP:
    """The samplers' view (see :mod:`pyrovae.diffusion.samplers`) of a model with
    the exact eps for the Gaussian data and VDM's continuous time:
    gamma(t) = gamma_min + (gamma_max - gamma_min) t, alpha_bar = sigmoid(-gamma)."""

    time_range = (0.0, 1.0)
    ref = torch.zeros((), dtype=torch.float64)

    def __init__(self, gamma_min: float = -8.0, gamma_max: float = 12.0, mu=MU, Sigma=SIGMA):
        self.gamma_min, self.gamma_max, self.mu, self.Sigma = gamma_min, gamma_max, mu, Sigma
        self.x_dim = len(mu)
        self.calls = 0

    def gamma(self, t):
        return self.gamma_min + (self.gamma_max - self.gamma_min) * t

    def check_steps(self, steps):
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        return steps

    def grid(self, steps, spacing="time"):
        return [i / steps for i in range(steps, -1, -1)]

    def log_alpha_bar(self, t):
        return torch.nn.functional.logsigmoid(-self.gamma(t.double()))

    def time_at(self, log_alpha_bar):
        gamma = math.log(-math.expm1(log_alpha_bar)) - log_alpha_bar
        return (gamma - self.gamma_min) / (self.gamma_max - self.gamma_min)

    def alpha_sigma(self, t):
        gamma = torch.as_tensor(self.gamma(float(t)), dtype=torch.float64)
        return float(torch.sigmoid(-gamma).sqrt()), float(torch.sigmoid(gamma).sqrt())

    def eps(self, x, t):
        self.calls += 1
        return exact_eps(x, *self.alpha_sigma(t), self.mu, self.Sigma)

    def flow(self, x, s, t):
        return exact_flow(x, *self.alpha_sigma(s), *self.alpha_sigma(t), self.mu, self.Sigma)


class ExactChainNet(nn.Module):
    """A chain's denoiser ``(x, tau) -> eps`` that returns eps*(x_t, t) for the
    chain's schedule, t = tau T / 1000 (log alpha_bar linear between steps)."""

    out_mult = 1

    def __init__(self, alphas_cumprod: torch.Tensor, mu=MU):
        super().__init__()
        self.mu = mu
        self.log_alpha_bar = torch.cat([alphas_cumprod.new_zeros(1), alphas_cumprod.log()]).double()
        self.weight = nn.Parameter(torch.zeros((), dtype=torch.float64))  # the samplers read the dtype from it

    def forward(self, x, tau):
        T = len(self.log_alpha_bar) - 1
        t = tau.double() * T / 1000
        k = t.ceil().clamp(1, T).long()
        log_ab = self.log_alpha_bar[k - 1] + (self.log_alpha_bar[k] - self.log_alpha_bar[k - 1]) * (t - (k - 1))
        return exact_eps(x.double(), (0.5 * log_ab).exp(), (-torch.expm1(log_ab)).sqrt(), self.mu).to(x.dtype)


class ExactVDMNet(nn.Module):
    """VDM's denoiser ``(z, tau) -> eps`` returning eps*(z_t, t), gamma_t read back
    from tau (VDM tells the network gamma rescaled on [GAMMA_MIN, GAMMA_MAX])."""

    def __init__(self, mu=MU):
        super().__init__()
        self.mu = mu
        self.weight = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, z, tau):
        gamma = tau.double() * (GAMMA_MAX - GAMMA_MIN) / 1000 + GAMMA_MIN
        return exact_eps(z.double(), torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt(), self.mu).to(z.dtype)
