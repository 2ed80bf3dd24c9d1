"""Losses that train a diffusion chain but are **not** bounds on anything:
their values are not ELBOs and are never reported as such (metrics.csv names
them ``train_loss_simple`` / ``train_loss_hybrid``).

- :class:`SimpleLoss`, Ho et al. (2020)'s L_simple: a reweighting of the
  bound's terms that trains good samplers;
- :class:`HybridLoss`, improved DDPM's (Nichol & Dhariwal 2021)
  L_simple + lambda L_vlb, which also trains learned variances.

Both share :class:`~pyrovae.infer.diffusion_elbo.DiffusionELBO`'s draw of
(t, x_t) and its Pyro interface (``loss``, ``loss_and_grads``,
``differentiable_loss``), so the training loop takes any of the three.
"""

from __future__ import annotations

from pyrovae.infer.bound import bits_per_dim
from pyrovae.infer.diffusion_elbo import ChainObjective, DiffusionELBO
from pyrovae.registry import lookup

OBJECTIVES = ("elbo", "simple", "hybrid")
"""The diffusion objectives by name (``--objective``): the bound and the two losses."""


class SimpleLoss(ChainObjective):
    """L_simple = E_{t ~ U(1..T), eps} mean_D (target - prediction)^2, summed
    over the batch, with the target the chain's parameterization predicts: eps,
    x_0 or mu_tilde_t(x_t, x_0). Times are uniform: the loss has no bound terms
    to importance-sample by."""

    name = "simple"
    train_metric = "train_loss_simple"

    def __init__(self, num_particles: int = 1):
        super().__init__(num_particles, "uniform")

    def _simple(self, chain, d: dict, output: tuple):
        pred = output[0]
        if chain.parameterization == "eps":
            target = d["noise"]
        elif chain.parameterization == "x0":
            target = d["x0_k"]
        else:
            target = chain.schedule.q_posterior_mean_variance(d["x_t"], d["x0_k"], d["t"])[0]
        return ((target - pred) ** 2).mean(-1).sum() / self.num_particles

    def _loss_and_terms(self, chain, x0):
        d = self._draw(chain, x0)
        return self._simple(chain, d, chain.model_output(d["x_t"], d["t"])), d["t"], None


class HybridLoss(SimpleLoss):
    """L_hybrid = L_simple + lambda L_vlb (improved DDPM), for learned variances:
    L_vlb is the estimate of sum_{t=1..T} L_{t-1} (as :class:`DiffusionELBO`'s,
    without the constant L_T) with the mean's prediction detached, so the bound
    term trains only sigma_t.

    Units as improved-diffusion's (``LossType.RESCALED_MSE``): L_vlb enters in
    **bits per dimension**, so ``hybrid_weight`` = lambda = 1e-3 means what the
    paper's lambda means: the loss is L_simple + lambda * L_vlb / (D ln 2), with
    L_vlb in nats per example.
    """

    name = "hybrid"
    train_metric = "train_loss_hybrid"

    def __init__(self, num_particles: int = 1, hybrid_weight: float = 1e-3, time_sampler="uniform"):
        ChainObjective.__init__(self, num_particles, time_sampler)
        if not hybrid_weight > 0:
            raise ValueError(f"hybrid_weight must be > 0, got {hybrid_weight}")
        self.hybrid_weight = hybrid_weight

    def _chain(self, model, guide):
        chain = super()._chain(model, guide)
        if chain.variance != "learned":
            raise ValueError(f"the hybrid loss trains learned variances; the chain has variance={chain.variance!r}")
        return chain

    def _loss_and_terms(self, chain, x0):
        d = self._draw(chain, x0)
        pred, v = chain.model_output(d["x_t"], d["t"])
        terms = chain.vb_terms(d["x0_k"], d["x_t"], d["t"], output=(pred.detach(), v))
        vlb = (d["weight"] * terms).sum() / self.num_particles
        return self._simple(chain, d, (pred, v)) + self.hybrid_weight * bits_per_dim(vlb, chain.x_dim), d["t"], terms


def make_objective(name: str, num_particles: int = 1, time_sampler="uniform"):
    """The diffusion objective ``name`` (in :data:`OBJECTIVES`): the bound,
    :class:`DiffusionELBO`, or one of the losses here."""
    lookup("objective", name, OBJECTIVES)
    if name == "elbo":
        return DiffusionELBO(num_particles, time_sampler)
    if name == "hybrid":
        return HybridLoss(num_particles, time_sampler=time_sampler)
    if name == "simple":
        if getattr(time_sampler, "name", time_sampler) != "uniform":
            raise ValueError("time_sampler 'importance' weights the bound's terms; objective 'simple' has none")
    return SimpleLoss(num_particles)
