"""Samplers over one view of a diffusion model: ancestral, DDIM and DPM-Solver++.

Every sampler here sees a model only through two things (the *view*,
:func:`diffusion_view`):

(a) its noise levels at a time t, as log alpha_bar(t): the forward process is
    x_t = alpha_t x_0 + sigma_t eps with alpha_t^2 = alpha_bar(t),
    sigma_t^2 = 1 - alpha_bar(t), and the log-SNR is
    lambda_t = log(alpha_t^2 / sigma_t^2) = log alpha_bar - log(1 - alpha_bar);

        chain (:class:`~pyrovae.diffusion.chain.DiffusionChain`): t in [0, T] in
              the chain's steps, alpha_bar_t from its :class:`NoiseSchedule` at
              integer t (alpha_bar_0 = 1), log alpha_bar linear in t between them
              (Lu et al. 2022's continuous time for a discrete chain);
        VDM (:class:`~pyrovae.diffusion.vdm.VDM`): t in [0, 1],
              alpha_bar(t) = sigmoid(-gamma(t)), so lambda_t = -gamma(t);

(b) its eps prediction eps_hat(x_t, t), and with it the data prediction
    x0_hat = (x_t - sigma_t eps_hat) / alpha_t.

(The ODE likelihood, :mod:`pyrovae.diffusion.ode`, also asks for the inverse
of log alpha_bar(t), ``time_at``.)

A K-step sampler walks a grid t_K > ... > t_0 from x_{t_K} ~ N(0, I) and
returns x_{t_0} / alpha_{t_0}: the chain's grid is its respaced times
tau_K = T > ... > tau_1 (those of :meth:`NoiseSchedule.respace`) and t_0 = 0,
where alpha = 1 and the last step returns x0_hat(x_{tau_1}); VDM's is
t_i = i / K, whose z_0 is still (slightly) noisy, returned as z_0 / alpha_0
(the centre of its decoder p(x | z_0)). One network call per step, K in all.

- ``"ddim"`` (Song, Meng & Ermon 2021), from s to t < s:

      x_t = alpha_t x0_hat + sqrt(sigma_t^2 - sigma_eta^2) eps_hat + sigma_eta z,
      sigma_eta^2 = eta^2 (sigma_t^2 / sigma_s^2) (1 - alpha_bar_s / alpha_bar_t),

  eta = 0 the deterministic (probability-flow) sampler, eta = 1 the ancestral
  sampler with sigma_t^2 = beta_tilde_t of the chain respaced to the grid.
- ``"dpm-solver++"`` (Lu et al. 2022, 2M, data prediction), in the half log-SNR
  lambda_t / 2 = log(alpha_t / sigma_t) that Lu et al. call lambda, h_i = (lambda_t - lambda_s) / 2:

      x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h_i) D_i,
      D_i = (1 + 1 / (2 r_i)) x0_hat_s - 1 / (2 r_i) x0_hat_prev,   r_i = h_{i-1} / h_i,

  first order (D_i = x0_hat_s) at the first step and at a step to lambda = inf.
- ``"ancestral"``: the model's own ``sample`` (the chain's p_theta(x_{t-1} | x_t)
  with its own variances, VDM's p_theta(z_s | z_t)).

:func:`encode` runs DDIM (eta = 0) the other way: latents x_{t_K} that the
deterministic samplers decode back to x (DDIM inversion).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from pyrovae.diffusion.base import DiffusionModel

if TYPE_CHECKING:
    from pyrovae.diffusion.chain import DiffusionChain
    from pyrovae.diffusion.vdm import VDM
from pyrovae.registry import lookup

SAMPLERS = ("ancestral", "ddim", "dpm-solver++")
SPACINGS = ("time", "logsnr")
DEFAULT_SPACING = {"ancestral": "time", "ddim": "time", "dpm-solver++": "logsnr"}


class ChainView:
    """A :class:`DiffusionChain` seen by the samplers and the ODE (see the module
    docstring). Relies on the chain's ``T``, ``x_dim``, ``predict_eps`` and
    ``sample`` (the shared interface, :mod:`pyrovae.diffusion.base`), its
    ``schedule.alphas_cumprod`` and ``schedule.respace(steps).timesteps``, and
    between integer times (the ODE) on ``parameterization``, ``net`` and
    ``tables(dtype)["tau"]``."""

    def __init__(self, chain: DiffusionChain):
        self.model, self.x_dim = chain, chain.x_dim
        # log alpha_bar at t = 0..T (alpha_bar_0 = 1), float64, on the schedule's device
        ab = chain.schedule.alphas_cumprod
        self._log_alpha_bar = torch.cat([ab.new_zeros(1), ab.log()])
        self.time_range = (1.0, float(chain.T))  # the network knows noise levels from x_1's to x_T's

    @property
    def ref(self) -> torch.Tensor:
        return self._log_alpha_bar

    def check_steps(self, steps) -> int:
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= self.model.T:
            raise ValueError(f"steps must be an integer in 1..T = {self.model.T}, got {steps!r}")
        return steps

    def grid(self, steps: int, spacing: str = "time") -> list[float]:
        """tau_K = T > ... > tau_1, then 0 (x_0): the respaced chain's times
        (``spacing="time"``), or the K integer times nearest to equal steps in
        log-SNR between t = 1 and T (``"logsnr"``)."""
        steps = self.check_steps(steps)
        if spacing == "time":
            taus = self.model.schedule.respace(steps).timesteps.tolist()
        else:
            times = torch.arange(1, self.model.T + 1, dtype=torch.float64)
            taus = (times[_logsnr_spaced(self.log_alpha_bar(times), steps)]).tolist()
        return [float(t) for t in reversed(taus)] + [0.0]

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_bar(t) for float64 ``t`` in [0, T]: linear through the
        schedule's log alpha_bar_t at integer t (slope log(1 - beta_k) on (k - 1, k])."""
        table = self._log_alpha_bar
        t = t.to(table)
        k = t.ceil().clamp(1, len(table) - 1).long()
        return table[k - 1] + (table[k] - table[k - 1]) * (t - (k - 1))

    def time_at(self, log_alpha_bar: float) -> float:
        """The t at which :meth:`log_alpha_bar` takes this value (its inverse)."""
        table = self._log_alpha_bar.cpu()
        k = int(torch.searchsorted(-table, torch.tensor(-log_alpha_bar, dtype=table.dtype)).clamp(1, len(table) - 1))
        lo, hi = float(table[k - 1]), float(table[k])
        return (k - 1) + (log_alpha_bar - lo) / (hi - lo)

    def eps(self, x_t: torch.Tensor, t: float) -> torch.Tensor:
        """eps_hat(x_t, t). At an integer t this is the chain's own prediction;
        between steps the network is told the interpolated time (the ODE's
        continuous limit), which needs an eps or x0 parameterisation."""
        chain = self.model
        if float(t).is_integer() and t >= 1:
            return chain.predict_eps(x_t, int(t))
        if chain.parameterization == "mean":
            raise ValueError(
                "a chain with parameterization 'mean' predicts its own steps' means only; "
                f"eps between steps (t = {t}) needs parameterization 'eps' or 'x0'"
            )
        # the time the network is told, linear between the steps' (read in x_t's dtype, as model_output does)
        tau_table = chain.tables(x_t.dtype)["tau"]
        tau = float(tau_table[0])
        if chain.T > 1:
            k = min(max(math.ceil(t), 2), chain.T)
            lo, hi = float(tau_table[k - 2]), float(tau_table[k - 1])
            tau = lo + (hi - lo) * (t - (k - 1))
        pred = chain.net(x_t, torch.full(x_t.shape[:-1], tau, dtype=x_t.dtype, device=x_t.device))[..., : self.x_dim]
        if chain.parameterization == "eps":
            return pred
        alpha, sigma = alpha_sigma(self, t)
        return (x_t - alpha * pred) / sigma  # pred is x0_hat

    def ancestral(self, n: int, steps: int, clip_x0: bool) -> torch.Tensor:
        return self.model.sample(n, steps=steps, clip_x0=clip_x0)


class VDMView:
    """A :class:`VDM` seen by the samplers and the ODE (see the module docstring).
    Relies on the model's ``x_dim``, ``predict_eps``, ``reference`` and
    ``sample`` (the shared interface, :mod:`pyrovae.diffusion.base`) and its
    ``gamma`` schedule."""

    time_range = (0.0, 1.0)

    def __init__(self, vdm: VDM):
        self.model, self.x_dim = vdm, vdm.x_dim

    @property
    def ref(self) -> torch.Tensor:
        return self.model.reference()

    def check_steps(self, steps) -> int:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        return steps

    def grid(self, steps: int, spacing: str = "time") -> list[float]:
        """t_i = i / K, i = K..0 (VDM's own sampling grid, ``spacing="time"``), or
        the times of equal steps in gamma (``"logsnr"``), found on a fine grid of t."""
        steps = self.check_steps(steps)
        if spacing == "time":
            return [i / steps for i in range(steps, -1, -1)]
        fine = torch.linspace(0, 1, max(4097, 8 * steps + 1), dtype=torch.float64)
        return fine[_logsnr_spaced(self.log_alpha_bar(fine), steps + 1)].flip(0).tolist()

    def log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """log sigmoid(-gamma(t)), float64."""
        with torch.no_grad():
            return torch.nn.functional.logsigmoid(-self.model.gamma(t.to(self.ref)).double())

    def time_at(self, log_alpha_bar: float) -> float:
        """The t with log sigmoid(-gamma(t)) = ``log_alpha_bar``: gamma(t) =
        log(1 - alpha_bar) - log alpha_bar, found by bisection (gamma is increasing)."""
        target = math.log(-math.expm1(log_alpha_bar)) - log_alpha_bar
        lo, hi = torch.zeros(()), torch.ones(())
        with torch.no_grad():
            for _ in range(40):
                mid = (lo + hi) / 2
                if float(self.model.gamma(mid.to(self.ref))) < target:
                    lo = mid
                else:
                    hi = mid
        return float((lo + hi) / 2)

    def eps(self, x_t: torch.Tensor, t: float) -> torch.Tensor:
        return self.model.predict_eps(x_t, float(t))

    def ancestral(self, n: int, steps: int, clip_x0: bool) -> torch.Tensor:
        if clip_x0:
            raise ValueError(
                "clip_x0 is not an option of VDM's ancestral sampler; its decoder returns pixels in [-1, 1]"
            )
        return self.model.sample(n, steps=steps)


def _logsnr_spaced(log_alpha_bar: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` distinct candidate times, increasing, first and last
    included, whose log-SNR lambda = log alpha_bar - log(1 - alpha_bar) (from
    the candidates' increasing times' ``log_alpha_bar``) is nearest to k equally
    spaced values between the end points' (Lu et al.'s "logSNR" steps)."""
    lam = log_alpha_bar - torch.log(-torch.expm1(log_alpha_bar))
    targets = torch.linspace(float(lam[0]), float(lam[-1]), k, dtype=lam.dtype)
    idx = (lam[None, :] - targets[:, None]).abs().argmin(1).tolist()
    # neighbours that round to the same candidate move apart, keeping both ends
    idx[0], idx[-1] = 0, len(lam) - 1
    for j in range(1, k - 1):
        idx[j] = max(idx[j], idx[j - 1] + 1)
    for j in range(k - 2, -1, -1):
        idx[j] = min(idx[j], idx[j + 1] - 1)
    return torch.tensor(idx)


def diffusion_view(model):
    """The view of ``model`` the samplers and the ODE use: a :class:`ChainView`,
    a :class:`VDMView`, or ``model`` itself if it already has the view's
    methods (``grid``, ``log_alpha_bar``, ``eps``, ``check_steps``, ``x_dim``,
    ``time_range``, ``ref``; ``time_at``, the inverse of ``log_alpha_bar``, for the ODE)."""
    if isinstance(model, DiffusionModel):
        return model.sampler_view()
    needed = ("grid", "log_alpha_bar", "eps", "check_steps", "x_dim", "time_range", "ref", "time_at")
    if all(hasattr(model, name) for name in needed):
        return model
    raise TypeError(
        f"model must be a DiffusionChain, a VDM or a view with {', '.join(needed)}; got {type(model).__name__}"
    )


def alpha_sigma(view, t: float) -> tuple[float, float]:
    """(alpha_t, sigma_t) as Python floats, computed in float64."""
    log_ab = float(view.log_alpha_bar(torch.tensor([float(t)], dtype=torch.float64))[0])
    return math.exp(0.5 * log_ab), math.sqrt(-math.expm1(log_ab))


def half_log_snr(alpha: float, sigma: float) -> float:
    """lambda / 2 = log(alpha / sigma), DPM-Solver's time variable; +inf at sigma = 0."""
    return math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)


def _check_args(sampler: str, eta: float, spacing: str | None) -> None:
    lookup("sampler", sampler, SAMPLERS)
    if spacing is not None:
        lookup("spacing", spacing, SPACINGS)
    if sampler == "ancestral" and spacing not in (None, "time"):
        raise ValueError(f"the ancestral sampler walks its model's own grid (spacing 'time'), got spacing={spacing!r}")
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
    if eta and sampler != "ddim":
        raise ValueError(f"eta applies to the ddim sampler only, got eta={eta!r} with sampler={sampler!r}")


def _x0_and_eps(view, x: torch.Tensor, t: float, alpha: float, sigma: float, clip_x0: bool):
    """(x0_hat, eps_hat) at (x_t, t); with ``clip_x0`` x0_hat is clamped to
    [-1, 1] and eps_hat recomputed from it (as improved-diffusion's DDIM does), so
    the two stay consistent: x_t = alpha_t x0_hat + sigma_t eps_hat."""
    eps = view.eps(x, t)
    x0 = (x - sigma * eps) / alpha
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps = (x - alpha * x0) / sigma
    return x0, eps


def check_sampler_args(model, steps, sampler: str = "ancestral", eta: float = 0.0, spacing: str | None = None):
    """Raise ``ValueError`` for arguments :func:`sample` would refuse; return the view."""
    view = diffusion_view(model)
    _check_args(sampler, eta, spacing)
    view.check_steps(steps)
    return view


@torch.no_grad()
def sample(
    model,
    n: int,
    steps: int,
    sampler: str = "ancestral",
    eta: float = 0.0,
    clip_x0: bool = False,
    seed: int | None = None,
    x_T: torch.Tensor | None = None,
    spacing: str | None = None,
) -> torch.Tensor:
    """``n`` samples of ``model`` (a chain, a VDM or a view), shape ``(n, D)``, in
    ``steps`` network calls with ``sampler`` (see the module docstring).

    :param eta: DDIM's noise, in [0, 1] (0: deterministic; 1: ancestral with beta_tilde).
    :param clip_x0: clamp each x0_hat to [-1, 1] (images; off where the model is
        evaluated as a density).
    :param seed: draw x_{t_K} and every step's noise from a generator seeded with
        this (``None``: torch's global generator, as ``pyro.set_rng_seed`` sets it).
    :param x_T: the starting latent x_{t_K}, shape ``(n, D)`` (deterministic
        samplers only; e.g. from :func:`encode`); default a draw from N(0, I).
    :param spacing: the grid: ``"time"`` (equal steps in t: the respaced chain's
        times, VDM's i / K) or ``"logsnr"`` (equal steps in log-SNR); default
        ``"time"`` for ancestral and DDIM, ``"logsnr"`` for DPM-Solver++, whose
        multistep extrapolation suffers from very unequal steps in lambda (the
        linear schedule's first step from t = 1 to the next respaced time).
    """
    view = check_sampler_args(model, steps, sampler, eta, spacing)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    generator = None if seed is None else torch.Generator(view.ref.device).manual_seed(seed)
    if sampler == "ancestral":
        if x_T is not None:
            raise ValueError("x_T is an option of the deterministic samplers (ddim, dpm-solver++), not of ancestral")
        if generator is None:
            return view.ancestral(n, steps, clip_x0)
        with torch.random.fork_rng(devices=[view.ref.device] if view.ref.is_cuda else []):
            torch.manual_seed(seed)
            return view.ancestral(n, steps, clip_x0)
    dtype = _dtype(view)
    if x_T is None:
        x = torch.randn(n, view.x_dim, generator=generator, dtype=dtype, device=view.ref.device)
    else:
        if tuple(x_T.shape) != (n, view.x_dim):
            raise ValueError(f"x_T must have shape ({n}, {view.x_dim}), got {tuple(x_T.shape)}")
        x = x_T.to(dtype)
    times = view.grid(steps, spacing or DEFAULT_SPACING[sampler])
    return _solve(view, x, times, sampler, eta, clip_x0, generator)


def _dtype(view) -> torch.dtype:
    params = next(iter(view.model.parameters()), None) if hasattr(view, "model") else None
    return params.dtype if params is not None else view.ref.dtype if view.ref.is_floating_point() else torch.float32


def _solve(view, x, times, sampler, eta, clip_x0, generator) -> torch.Tensor:
    """Walk ``times`` (decreasing) from x = x_{times[0]}; return x_{t_0} / alpha_{t_0}."""
    levels = [alpha_sigma(view, t) for t in times]
    half_lambdas = [half_log_snr(a, s) for a, s in levels]
    x0_prev = h_prev = None
    for i in range(len(times) - 1):
        (alpha_s, sigma_s), (alpha_t, sigma_t) = levels[i], levels[i + 1]
        x0, eps = _x0_and_eps(view, x, times[i], alpha_s, sigma_s, clip_x0)
        h = half_lambdas[i + 1] - half_lambdas[i]
        if sampler == "ddim":
            # eta^2 (sigma_t^2 / sigma_s^2)(1 - alpha_bar_s / alpha_bar_t), 0 at sigma_t = 0
            var_eta = eta**2 * (sigma_t / sigma_s) ** 2 * -math.expm1(2 * (math.log(alpha_s) - math.log(alpha_t)))
            x = alpha_t * x0 + math.sqrt(max(sigma_t**2 - var_eta, 0.0)) * eps
            if var_eta > 0:
                x = x + math.sqrt(var_eta) * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        else:
            d = x0
            if x0_prev is not None and math.isfinite(h):
                r = h_prev / h
                d = (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
            x = (sigma_t / sigma_s) * x - alpha_t * math.expm1(-h) * d
            x0_prev, h_prev = x0, h
    out = x / levels[-1][0]
    return out.clamp(-1.0, 1.0) if clip_x0 else out


@torch.no_grad()
def encode(model, x: torch.Tensor, steps: int, spacing: str = "time") -> torch.Tensor:
    """DDIM inversion: the latent x_{t_K} from which the deterministic samplers
    (DDIM with eta = 0, and DPM-Solver++ as the same ODE's solver) decode ``x``
    (shape ``(n, D)``). The grid is walked upwards, t_0 -> t_K, starting at
    x_{t_0} = alpha_{t_0} x, each step the DDIM step with eps_hat at the step's
    start (at t_0 = 0 of the chain, where the network is not defined, at t_1):

        x_t = alpha_t x0_hat + sigma_t eps_hat,   x0_hat = (x_s - sigma_s eps_hat) / alpha_s.

    The round trip's error falls with ``steps`` at DDIM's first order; decode
    with the same ``steps`` and ``spacing``."""
    view = diffusion_view(model)
    steps = view.check_steps(steps)
    if not torch.is_tensor(x) or x.dim() != 2 or x.shape[1] != view.x_dim:
        raise ValueError(f"x must be a tensor of shape (n, {view.x_dim}), got {tuple(getattr(x, 'shape', ()))}")
    _check_args("ddim", 0.0, spacing)
    times = view.grid(steps, spacing)[::-1]
    levels = [alpha_sigma(view, t) for t in times]
    z = levels[0][0] * x.to(_dtype(view))
    for i in range(len(times) - 1):
        (alpha_s, sigma_s), (alpha_t, sigma_t) = levels[i], levels[i + 1]
        # eps at the start of the step, or at its end where the start is noise-free
        eps = view.eps(z, times[i] if sigma_s > 0 else times[i + 1])
        z = alpha_t * (z - sigma_s * eps) / alpha_s + sigma_t * eps
    return z
