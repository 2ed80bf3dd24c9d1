"""The likelihood of the probability-flow ODE (Song et al. 2021, "Score-Based
Generative Modeling through Stochastic Differential Equations").

For the forward process x_t = alpha_t x_0 + sigma_t eps, alpha_t^2 = alpha_bar(t),
sigma_t^2 = 1 - alpha_bar(t), the ODE whose marginals are the diffusion's,
with the score -eps_hat(x_t, t) / sigma_t, is

    dx_t/dt = 1/2 (d log alpha_bar / dt) (x_t - eps_hat(x_t, t) / sigma_t)

(VDM: log alpha_bar = log sigmoid(-gamma), so dx/dt = -1/2 gamma'(t) sigma_t^2 x_t
+ 1/2 gamma'(t) sigma_t eps_hat). It is solved in the log-SNR
lambda = log(alpha_bar / (1 - alpha_bar)) (VDM: -gamma) instead of t, where
d lambda / dt = (d log alpha_bar / dt) / sigma^2 and so

    dx/d lambda = f(x, lambda) = 1/2 (sigma^2 x - sigma eps_hat(x, t(lambda))),   sigma^2 = sigmoid(-lambda):

smooth and bounded, where the chain's d log alpha_bar / dt jumps at every
integer t (an adaptive solver pays for each jump). Along its solution from
lambda_max = lambda(t_min) down to lambda_min = lambda(t_max) the log-density
changes by the divergence of f (the instantaneous change of variables), so

    log p(x_{t_min}) = log N(x_{t_max}; 0, I) + int_{lambda_max}^{lambda_min} div f(x, lambda) d lambda,
    div f = 1/2 (D sigma^2 - sigma div_x eps_hat).

div_x eps_hat is exact (D backward passes; small D) or Hutchinson's estimate
v^T (d eps_hat / dx) v with one Rademacher probe v per example, fixed along the
solve (as score_sde does), which keeps log p unbiased. The ODE is solved by
``torchdiffeq.odeint`` (adaptive dopri5, rtol = atol = 1e-5 as score_sde).

The data x are read as x_{t_min} / alpha_{t_min}, the samplers' convention
(:mod:`pyrovae.diffusion.samplers`), so log p(x) = log p(x_{t_min}) + D log alpha_{t_min}.
The time range is the model's view's ``time_range``: VDM's [0, 1] (its
gamma(t)); the chain's [1, T] in its steps, log alpha_bar linear in t between
the integer steps and the network told the interpolated time (the chain's
variance-preserving continuous limit as Lu et al. 2022 build it), starting at
x_1's noise level, the least the network was trained on.

Discrete data: 8-bit pixels on the 256 bin centres of [-1, 1] (bin width
Delta = 2/255) are dequantised uniformly, x + Delta (u - 1/2), u ~ U(0, 1)^D,
as score_sde does, and then, by Jensen's inequality,

    log P(x) >= E_u[log p(x + Delta (u - 1/2))] + D log Delta,

so the reported figure, one draw of u per example, is an unbiased estimate of
a lower bound on the discrete model's log-likelihood, as the ELBO is (whose
discrete decoder bounds it another way: a variational posterior over the
latents instead of over the dequantisation noise).
"""

from __future__ import annotations

import math

import torch

from pyrovae.diffusion.samplers import _dtype, alpha_sigma, diffusion_view
from pyrovae.infer.bound import bits_per_dim

BIN_WIDTH = 2.0 / 255  # the 256 values of 8-bit pixels scaled to [-1, 1]


def divergence(fn, x: torch.Tensor, probe: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(x), div_x fn(x)) for ``fn`` mapping ``(n, D) -> (n, D)`` row by row:
    the trace of the Jacobian exactly (``probe=None``; D backward passes) or
    Hutchinson's estimate v^T (d fn / dx) v, unbiased for E[v v^T] = I
    (``probe`` v of ``x``'s shape, e.g. Rademacher)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        y = fn(x)
        if probe is not None:
            (vjp,) = torch.autograd.grad(y, x, probe)
            return y.detach(), (vjp * probe).sum(-1)
        div = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for d in range(x.shape[1]):
            (row,) = torch.autograd.grad(y[:, d].sum(), x, retain_graph=d < x.shape[1] - 1)
            div = div + row[:, d]
        return y.detach(), div


def ode_log_likelihood(
    model,
    x: torch.Tensor,
    exact_divergence: bool = False,
    dequantise: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    seed: int | None = None,
) -> dict:
    """log p(x) under the probability-flow ODE of ``model`` (a chain, a VDM or a
    sampler view), per example.

    :param x: ``(n, D)`` data; pixels on the 256 bin centres of [-1, 1] when
        ``dequantise`` (then the result is a bound on the discrete log-likelihood).
    :param exact_divergence: the divergence by D backward passes instead of Hutchinson's.
    :param seed: seeds the dequantisation and the probes (``None``: the global generator).
    :returns: dict with ``log_likelihood`` (n,) in nats, ``bits_per_dim`` (n,)
        (= -log_likelihood / (D ln 2)), ``nfe`` (network evaluations of the
        solve, the same for every example: the batch shares its steps) and
        ``dequantised`` (whether the figure bounds a discrete log-likelihood).
    """
    from torchdiffeq import odeint

    view = diffusion_view(model)
    if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != view.x_dim or len(x) == 0:
        raise ValueError(f"x must be a tensor of shape (n >= 1, {view.x_dim}), got {tuple(getattr(x, 'shape', ()))}")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    dtype, device = _dtype(view), x.device
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    x = x.detach().to(dtype)
    n, D = x.shape
    if dequantise:
        x = x + BIN_WIDTH * (torch.rand(x.shape, generator=generator, dtype=dtype, device=device) - 0.5)
    probe = None
    if not exact_divergence:
        probe = torch.randint(0, 2, x.shape, generator=generator, device=device).to(dtype) * 2 - 1
    t_min, t_max = view.time_range
    (alpha_min, sigma_min), (alpha_max, sigma_max) = alpha_sigma(view, t_min), alpha_sigma(view, t_max)
    nfe = 0

    def drift(lam: torch.Tensor, state: tuple) -> tuple:
        nonlocal nfe
        nfe += 1
        lam = float(lam)
        log_alpha_bar = -math.log1p(math.exp(-lam)) if lam > 0 else lam - math.log1p(math.exp(lam))
        var = 1 / (1 + math.exp(lam)) if lam > -700 else 1.0  # sigmoid(-lambda)
        t = view.time_at(log_alpha_bar)
        eps, div_eps = divergence(lambda z: view.eps(z, t), state[0], probe)
        sigma = math.sqrt(var)
        return 0.5 * (var * state[0] - sigma * eps), 0.5 * (D * var - sigma * div_eps)

    lambdas = [2 * (math.log(a) - math.log(s)) for a, s in ((alpha_min, sigma_min), (alpha_max, sigma_max))]
    times = torch.tensor(lambdas, dtype=dtype, device=device)
    start = (alpha_min * x, torch.zeros(n, dtype=dtype, device=device))
    with torch.no_grad():
        x_end, delta = (s[-1] for s in odeint(drift, start, times, rtol=rtol, atol=atol, method="dopri5"))
    log_prior = -0.5 * x_end.square().sum(-1) - 0.5 * D * math.log(2 * math.pi)
    log_p = log_prior + delta + D * math.log(alpha_min)
    if dequantise:
        log_p = log_p + D * math.log(BIN_WIDTH)
    return {"log_likelihood": log_p, "bits_per_dim": bits_per_dim(-log_p, D), "nfe": nfe, "dequantised": dequantise}
