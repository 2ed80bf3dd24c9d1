"""A time-subsampled, unbiased ELBO for the diffusion chain, at a cost independent of T.

Also the pieces every objective on the chain shares (:mod:`pyrovae.infer.losses`
builds the losses that are not bounds from them): the time samplers and the
draw of (t, x_t) per example and particle.
"""

from __future__ import annotations

import torch
from pyro.infer import ELBO

from pyrovae import distributed, params
from pyrovae.infer.bound import Bound
from pyrovae.infer.objective import DifferentiableLossMixin
from pyrovae.registry import lookup

TIME_SAMPLERS = ("uniform", "importance")


class UniformTimeSampler:
    """p(t) = 1/T for t = 1..T."""

    name = "uniform"

    def probs(self, T: int, device) -> torch.Tensor:
        """p(t) for t = 1..T, shape ``(T,)``, float64 (made once per T and device:
        callers must not write into it)."""
        cache = self.__dict__.setdefault("_uniform", {})
        key = (T, torch.device(device))
        if key not in cache:
            cache[key] = torch.full((T,), 1.0 / T, device=device, dtype=torch.float64)
        return cache[key]

    def update(self, t: torch.Tensor, terms: torch.Tensor) -> None:
        """Record the bound's terms seen at times ``t`` (nothing to record here)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"a uniform time sampler has no state, got keys {sorted(state)}")


class ImportanceTimeSampler(UniformTimeSampler):
    """Improved DDPM's importance sampling of t: p(t) proportional to
    sqrt(E[L_{t-1}^2]), estimated from the last ``history`` values seen per t;
    uniform until every t has ``history`` values, then mixed with
    ``uniform_mix`` (0.1%) of the uniform p(t) so that no t is starved.

    Its history is state (:meth:`state_dict`), saved with a checkpoint so that
    a resumed run draws the same times as the run it continues.
    """

    name = "importance"

    def __init__(self, history: int = 10, uniform_mix: float = 1e-3):
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}")
        if not 0 < uniform_mix <= 1:
            raise ValueError(f"uniform_mix must be in (0, 1], got {uniform_mix}")
        self.history, self.uniform_mix = history, uniform_mix
        self._squares: torch.Tensor | None = None  # (T, history): the last squared terms per t
        self._count: torch.Tensor | None = None  # (T,): terms seen per t

    def probs(self, T: int, device) -> torch.Tensor:
        uniform = super().probs(T, device)
        if self._count is None or (self._count < self.history).any():
            return uniform
        if self._squares.shape[0] != T:
            raise ValueError(f"this sampler's history is for T = {self._squares.shape[0]}, not T = {T}")
        p = self._squares.mean(-1).sqrt().to(device)
        return (1 - self.uniform_mix) * p / p.sum() + self.uniform_mix * uniform

    def update(self, t: torch.Tensor, terms: torch.Tensor) -> None:
        if self._squares is None:
            raise RuntimeError("update() before start(T, device): the sampler does not know T yet")
        for ti, li in zip(t.reshape(-1).tolist(), terms.detach().reshape(-1).tolist()):
            self._squares[ti - 1] = torch.roll(self._squares[ti - 1], -1)
            self._squares[ti - 1, -1] = li**2
            self._count[ti - 1] += 1

    def start(self, T: int, device) -> None:
        """An empty history for T steps (on the first draw)."""
        if self._squares is None:
            self._squares = torch.zeros(T, self.history, device=device, dtype=torch.float64)
            self._count = torch.zeros(T, dtype=torch.long, device=device)

    def state_dict(self) -> dict:
        """The history (``None`` before the first draw), copied to the CPU."""
        if self._squares is None:
            return {"squares": None, "count": None}
        return {"squares": self._squares.detach().cpu().clone(), "count": self._count.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"squares", "count"}:
            raise ValueError(f"an importance time sampler's state has keys 'squares' and 'count', got {sorted(state)}")
        squares, count = state["squares"], state["count"]
        if squares is not None and (
            squares.dim() != 2 or squares.shape[1] != self.history or count.shape != squares.shape[:1]
        ):
            raise ValueError(
                f"squares must have shape (T, {self.history}) and count (T,), got {tuple(squares.shape)} and {tuple(count.shape)}"
            )
        self._squares = None if squares is None else squares.clone().to(torch.float64)
        self._count = None if count is None else count.clone().to(torch.long)


def make_time_sampler(time_sampler) -> UniformTimeSampler:
    """A sampler object from its name in :data:`TIME_SAMPLERS` (or the object itself)."""
    if isinstance(time_sampler, UniformTimeSampler):
        return time_sampler
    if time_sampler == "uniform":
        return UniformTimeSampler()
    if time_sampler == "importance":
        return ImportanceTimeSampler()
    lookup("time_sampler", time_sampler, TIME_SAMPLERS)


class ChainObjective(DifferentiableLossMixin):
    """What every objective on a :class:`~pyrovae.diffusion.chain.DiffusionChain`
    shares: it checks that ``model``/``guide`` are the chain's, draws per example
    and particle t ~ p(t) (``time_sampler``) and x_t ~ q(x_t|x_0), and wraps
    its per-batch work, :meth:`_loss_and_terms`, in Pyro's ``loss`` /
    ``loss_and_grads`` / ``differentiable_loss`` interface.

    ``train_metric`` names its training value in metrics.csv: ``train_elbo``
    for a bound (the loop writes -loss), ``train_loss_<name>`` for a loss that
    is not one (the loop writes the loss).
    """

    train_metric: str

    def __init__(self, num_particles: int = 1, time_sampler="uniform"):
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
        self.num_particles = num_particles
        self.time_sampler = make_time_sampler(time_sampler)

    @torch.compiler.disable  # a check on Python objects: under torch.compile it runs as it is
    def _chain(self, model, guide):
        from pyrovae.diffusion.chain import DiffusionChain

        name = type(self).__name__
        chain = getattr(model, "__self__", None)
        if not isinstance(chain, DiffusionChain) or model.__func__ is not DiffusionChain.model:
            raise TypeError(f"{name} needs model=chain.model of a DiffusionChain, got {model!r}")
        if getattr(guide, "__self__", None) is not chain:
            raise TypeError(f"{name} needs guide to be a guide of the same chain, got {guide!r}")
        return chain

    def _draw(self, chain, x0: torch.Tensor) -> dict:
        """``k = num_particles`` draws per example: times ``t`` (k, B), their
        importance weights 1/p(t), the noise and x_t = sqrt(alpha_bar_t) x_0 +
        sqrt(1 - alpha_bar_t) noise (k, B, D), and x_0 expanded to (k, B, D)."""
        params.module(chain, "diffusion")  # a name of its own in the param store
        x0 = chain.check_data(x0)
        T, k, B = chain.T, self.num_particles, x0.shape[0]
        if isinstance(self.time_sampler, ImportanceTimeSampler):
            self.time_sampler.start(T, x0.device)
        p = self.time_sampler.probs(T, x0.device)
        t = torch.multinomial(p, k * B, replacement=True).reshape(k, B) + 1
        x0_k = x0.expand(k, B, chain.x_dim)
        noise = torch.randn_like(x0_k)
        return {
            "x0": x0,
            "x0_k": x0_k,
            "t": t,
            "weight": 1.0 / p[t - 1].to(x0.dtype),
            "noise": noise,
            "x_t": chain.q_sample(x0_k, t, noise),
        }

    def _loss_and_terms(self, chain, x0: torch.Tensor):
        """The differentiable loss summed over the batch, the times drawn and
        their bound terms (``None`` when the objective has none): each objective says how."""
        raise NotImplementedError(f"{type(self).__name__} must define _loss_and_terms(chain, x0)")

    def differentiable_loss(self, model, guide, x0: torch.Tensor) -> torch.Tensor:
        """The loss; with gradients on (a training step, as the trainer takes
        it), the bound's terms also update the time sampler, with every
        process's draws under torchrun so that all ranks keep the same p(t)."""
        loss, t, terms = self._loss_and_terms(self._chain(model, guide), x0)
        if terms is not None and torch.is_grad_enabled():
            self.time_sampler.update(distributed.all_gather_cat(t), distributed.all_gather_cat(terms.detach()))
        return loss


class DiffusionELBO(ChainObjective, ELBO):
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

    with k = ``num_particles``; p(t) from ``time_sampler``: uniform
    (:class:`UniformTimeSampler`) or importance-sampled from the terms seen
    (:class:`ImportanceTimeSampler`, improved DDPM), kept as
    ``self.time_sampler`` with its own ``state_dict``. The cost is k network
    calls per example whatever T.

    Any ELBO that traces the literal chain (``Trace_ELBO``, ``TraceMeanField_ELBO``)
    costs O(T), so this class is an ELBO subclass that knows the chain's
    structure: ``model`` must be the bound method ``chain.model`` of a
    ``DiffusionChain`` and ``guide`` one of its guides (``guide_forward`` or
    ``guide_posterior``: the encoder is fixed, its closed forms live in the
    schedule, so the guide is never run). Drop-in for ``SVI(chain.model,
    chain.guide_posterior, optim, DiffusionELBO())``.

    The losses that train diffusion models but are not bounds (Ho et al.'s
    L_simple, improved DDPM's hybrid) are :mod:`pyrovae.infer.losses`.
    Losses are summed over the batch, as Pyro's ELBOs sum over a plate.
    """

    train_metric = "train_elbo"

    def __init__(self, num_particles: int = 1, time_sampler="uniform"):
        ChainObjective.__init__(self, num_particles, time_sampler)
        ELBO.__init__(self, num_particles=num_particles)

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("DiffusionELBO never traces the chain: that is what makes it O(1) in T")

    def _loss_and_terms(self, chain, x0: torch.Tensor):
        d = self._draw(chain, x0)
        terms = chain.vb_terms(d["x0_k"], d["x_t"], d["t"], noise=d["noise"])
        k = self.num_particles
        weighted = (d["weight"] * terms).sum()
        return chain.prior_kl(d["x0"]).sum() + (weighted if k == 1 else weighted / k), d["t"], terms

    @torch.no_grad()
    def terms(self, model, guide, x0: torch.Tensor) -> Bound:
        """The bound's named terms per example (:class:`~pyrovae.infer.bound.Bound`),
        in nats: ``recon`` = E_q[log p_theta(x_0|x_1)] and ``kl_layers`` =
        sum_{t=2..T} E_q[L_{t-1}], each estimated from ``num_particles`` draws
        per example (x_1 ~ q(x_1|x_0) for ``recon``; t uniform on 2..T for
        ``kl_layers``: stratified, so the rare decoder term is never left to
        chance), and ``kl_top`` = L_T in closed form. Unbiased for the ELBO:
        ``recon - kl_top - kl_layers``."""
        chain = self._chain(model, guide)
        params.module(chain, "diffusion")  # a name of its own in the param store
        x0 = chain.check_data(x0)
        T, k, B = chain.T, self.num_particles, x0.shape[0]
        x0_k = x0.expand(k, B, chain.x_dim)
        ones = torch.ones(k, B, dtype=torch.long, device=x0.device)
        noise = torch.randn_like(x0_k)
        recon = -chain.vb_terms(x0_k, chain.q_sample(x0_k, ones, noise), ones, noise=noise).sum(0) / k
        kl_layers = torch.zeros(B, dtype=x0.dtype, device=x0.device)
        if T > 1:
            t = torch.randint(2, T + 1, (k, B), device=x0.device)
            noise = torch.randn_like(x0_k)
            kl_layers = (T - 1) * chain.vb_terms(x0_k, chain.q_sample(x0_k, t, noise), t, noise=noise).sum(0) / k
        return Bound(
            recon=recon, kl_top=chain.prior_kl(x0), kl_layers=kl_layers, dim=chain.x_dim if chain.discrete else None
        )
