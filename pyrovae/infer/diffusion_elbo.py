"""A time-subsampled, unbiased ELBO for the diffusion chain, at a cost independent of T."""

from __future__ import annotations

import pyro
import torch
from pyro.infer import ELBO
from pyro.util import warn_if_nan

OBJECTIVES = ("elbo", "simple", "hybrid")
TIME_SAMPLERS = ("uniform", "importance")


class DiffusionELBO(ELBO):
    """-ELBO of a :class:`~pyrovae.diffusion.chain.DiffusionChain`, estimated
    without tracing the chain.

    The seed's bound is a sum over time,

        -ELBO(x_0) = L_T + sum_{t=1..T} E_{q(x_t|x_0)}[L_{t-1}(x_0, x_t)],
        L_T     = KL(q(x_T|x_0) || N(0, I))                        (closed form, constant)
        L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t))    (closed form, t >= 2)
        L_0     = -log p_theta(x_0|x_1),

    so drawing, per example and per particle, t ~ p(t) and x_t ~ q(x_t|x_0)
    (one ``q_sample``) gives the unbiased estimate

        L_T + (1/k) sum_{j=1..k} L_{t_j - 1}(x_0, x_{t_j}) / p(t_j)

    with k = ``num_particles``; p(t) = 1/T (``time_sampler="uniform"``), or
    p(t) proportional to sqrt(E[L_{t-1}^2]) from the last 10 values seen per t
    (``"importance"``, improved DDPM; uniform until every t has 10 values, and
    mixed with 0.1% uniform). The cost is k network calls per example whatever T.

    Any ELBO that traces the literal chain (``Trace_ELBO``, ``TraceMeanField_ELBO``)
    costs O(T), so this class is an ELBO subclass that knows the chain's
    structure: ``model`` must be the bound method ``chain.model`` of a
    ``DiffusionChain`` and ``guide`` one of its guides (``guide_forward`` or
    ``guide_posterior``: the encoder is fixed, its closed forms live in the
    schedule, so the guide is never run). Drop-in for ``SVI(chain.model,
    chain.guide_posterior, optim, DiffusionELBO())``.

    ``objective="simple"`` is Ho et al.'s L_simple = E_{t,eps} mean_D (target -
    prediction)^2 (target eps, x_0 or mu_tilde by the chain's parameterization):
    a *reweighted* objective that trains good samplers but is **not** the ELBO
    and not a bound on anything; its value is not comparable with the ELBO.
    ``objective="hybrid"`` is improved DDPM's L_simple + lambda L_vlb for learned
    variances: lambda (``hybrid_weight``, 1e-3) times the estimate of
    sum_t L_{t-1} per dimension with the mean's prediction detached, so the
    bound term trains only sigma_t. Neither is the ELBO.

    Losses are summed over the batch, as Pyro's ELBOs sum over a plate.
    """

    def __init__(self, num_particles: int = 1, objective: str = "elbo", time_sampler: str = "uniform", hybrid_weight: float = 1e-3):
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
        super().__init__(num_particles=num_particles)
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(OBJECTIVES)}")
        if time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"unknown time_sampler {time_sampler!r}; expected one of {', '.join(TIME_SAMPLERS)}")
        self.objective, self.time_sampler, self.hybrid_weight = objective, time_sampler, hybrid_weight
        self._history: torch.Tensor | None = None  # (T, 10) last squared terms per t
        self._count: torch.Tensor | None = None

    def _chain(self, model, guide):
        from pyrovae.diffusion.chain import DiffusionChain

        chain = getattr(model, "__self__", None)
        if not isinstance(chain, DiffusionChain) or model.__func__ is not DiffusionChain.model:
            raise TypeError(f"DiffusionELBO needs model=chain.model of a DiffusionChain, got {model!r}")
        if getattr(guide, "__self__", None) is not chain:
            raise TypeError(f"DiffusionELBO needs guide to be a guide of the same chain, got {guide!r}")
        if self.objective == "hybrid" and chain.variance != "learned":
            raise ValueError(f"objective='hybrid' trains learned variances; the chain has variance={chain.variance!r}")
        if self.objective == "simple" and self.time_sampler == "importance":
            raise ValueError("time_sampler='importance' weights the bound's terms; objective='simple' has none")
        return chain

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("DiffusionELBO never traces the chain: that is what makes it O(1) in T")

    def time_probs(self, T: int, device) -> torch.Tensor:
        """p(t) for t = 1..T, shape ``(T,)``."""
        uniform = torch.full((T,), 1.0 / T, device=device, dtype=torch.float64)
        if self.time_sampler == "uniform" or self._count is None or (self._count < self._history.shape[1]).any():
            return uniform
        p = self._history.mean(-1).sqrt()
        return 0.999 * p / p.sum() + 0.001 * uniform

    def _update_history(self, t: torch.Tensor, terms: torch.Tensor) -> None:
        for ti, li in zip(t.reshape(-1).tolist(), terms.detach().reshape(-1).tolist()):
            self._history[ti - 1] = torch.roll(self._history[ti - 1], -1)
            self._history[ti - 1, -1] = li**2
            self._count[ti - 1] += 1

    def _loss_and_terms(self, chain, x0: torch.Tensor):
        """The differentiable loss, the times drawn ``(k, B)`` and their bound terms
        (``None`` for L_simple)."""
        pyro.module("diffusion", chain)
        x0 = chain.check_data(x0)
        T, k, B = chain.T, self.num_particles, x0.shape[0]
        if self.time_sampler == "importance" and self._history is None:
            self._history = torch.zeros(T, 10, device=x0.device, dtype=torch.float64)
            self._count = torch.zeros(T, dtype=torch.long, device=x0.device)
        p = self.time_probs(T, x0.device)
        t = torch.multinomial(p, k * B, replacement=True).reshape(k, B) + 1
        weight = 1.0 / p[t - 1].to(x0.dtype)
        x0_k = x0.expand(k, B, chain.x_dim)
        noise = torch.randn_like(x0_k)
        x_t = chain.schedule.q_sample(x0_k, t, noise)
        output = chain.model_output(x_t, t)
        if self.objective == "elbo":
            terms = chain.vb_terms(x0_k, x_t, t, output=output)
            return chain.prior_kl(x0).sum() + (weight * terms).sum() / k, t, terms
        pred = output[0]
        if chain.parameterization == "eps":
            target = noise
        elif chain.parameterization == "x0":
            target = x0_k
        else:
            target = chain.schedule.q_posterior_mean_variance(x_t, x0_k, t)[0]
        loss = ((target - pred) ** 2).mean(-1).sum() / k
        if self.objective == "simple":
            return loss, t, None
        terms = chain.vb_terms(x0_k, x_t, t, output=(pred.detach(), output[1]))
        return loss + self.hybrid_weight * (weight * terms).sum() / (k * chain.x_dim), t, terms

    def differentiable_loss(self, model, guide, x0: torch.Tensor) -> torch.Tensor:
        return self._loss_and_terms(self._chain(model, guide), x0)[0]

    def loss(self, model, guide, x0: torch.Tensor) -> float:
        """The estimate of -ELBO (or of L_simple / L_hybrid), summed over the batch."""
        with torch.no_grad():
            loss = self.differentiable_loss(model, guide, x0).item()
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, x0: torch.Tensor) -> float:
        loss, t, terms = self._loss_and_terms(self._chain(model, guide), x0)
        loss.backward()
        if self.time_sampler == "importance":
            self._update_history(t, terms)
        loss = loss.item()
        warn_if_nan(loss, "loss")
        return loss
