"""The bound's vocabulary, the same for every model (VAE, hierarchical VAE,
diffusion chain), per example and in nats:

    recon     = E_q[log p_theta(x | first latent)]      (the chain: the decoder term at t = 1)
    kl_top    = KL(q(top latent | ..) || p(top latent))  (the chain: L_T = KL(q(x_T|x_0) || p(x_T)))
    kl_1..kl_L, and kl_layers = their sum               (the chain: kl_layers = sum_{t=2..T} L_{t-1})
    elbo      = recon - kl_top - kl_layers
    bpd       = -elbo / (D ln 2)                         (bits per dimension, for a pmf likelihood)

Every model's ``bound(x)`` returns them as one :class:`Bound` of per-example
tensors; ``metrics.csv`` carries their means with ``train_``/``test_``
prefixes (``test_elbo``, ``test_bpd``, ...). :func:`bits_per_dim` is the
library's one conversion from nats to bits per dimension.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import torch

TERMS = ("recon", "kl_top", "kl_layers", "elbo", "bpd")


def bits_per_dim(nats, dim: int):
    """``nats / (dim ln 2)``: a negative log-likelihood (or -ELBO) of one
    ``dim``-dimensional example in nats, as bits per dimension. Works on floats
    and tensors alike."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    return nats / (dim * math.log(2))


@dataclasses.dataclass(frozen=True)
class Bound:
    r"""The named terms of one ELBO, per example, in nats: each a tensor of
    shape ``(B,)`` (or a broadcastable scalar tensor for a term a model does
    not have, e.g. ``kl_layers`` of a one-layer VAE)::

        elbo(x) = recon - kl_top - kl_layers  <=  log p(x)

    ``layers`` holds the per-layer KLs by name (``{"kl_1": .., "kl_L": ..}``)
    where a model has few layers (a VAE or hierarchical VAE; the diffusion
    chain's T terms are summed into ``kl_layers`` only). ``dim`` is the data's
    dimension D when the likelihood is a probability mass function (discrete
    data), so that :meth:`bpd` = -elbo / (D ln 2) is defined; ``None``
    otherwise. ``closed_form`` names the layers whose KL was taken in closed
    form (the rest by Monte Carlo), where the producer knows it.
    """

    recon: torch.Tensor
    kl_top: torch.Tensor
    kl_layers: torch.Tensor
    layers: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    dim: int | None = None
    closed_form: tuple = ()

    def __post_init__(self):
        for name in ("recon", "kl_top", "kl_layers"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"Bound.{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        if self.dim is not None and (isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1):
            raise ValueError(f"Bound.dim must be an integer >= 1 or None, got {self.dim!r}")

    def elbo(self) -> torch.Tensor:
        """recon - kl_top - kl_layers, per example (nats)."""
        return self.recon - self.kl_top - self.kl_layers

    def nats(self) -> torch.Tensor:
        """-elbo per example: an upper bound on -log p(x) in nats."""
        return -self.elbo()

    def bpd(self) -> torch.Tensor:
        """-elbo / (D ln 2) per example: bits per dimension (discrete data only)."""
        if self.dim is None:
            raise ValueError(
                "bits per dimension need a likelihood that is a probability mass function (Bound.dim is None): "
                "a density over continuous x has no bits/dim"
            )
        return bits_per_dim(self.nats(), self.dim)

    def summary(self) -> dict:
        """The means over the examples as floats, in the vocabulary's order:
        ``recon``, ``kl_top``, ``kl_layers`` (left out for a one-layer model,
        whose ``layers`` is ``{"kl_1": kl_top}``),
        ``elbo``, ``bpd`` (discrete data), then the per-layer ``kl_l``."""

        def mean(v):
            return float(torch.as_tensor(v).double().mean())

        kl_layers = None if len(self.layers) == 1 else mean(self.kl_layers)
        out = bound_terms(mean(self.recon), mean(self.kl_top), kl_layers, self.dim)
        out.update({name: mean(v) for name, v in self.layers.items()})
        return out

    def detach(self) -> Bound:
        """The same terms cut from the autograd graph."""
        return self.map(torch.Tensor.detach)

    def map(self, fn) -> Bound:
        """A Bound with ``fn`` applied to every term tensor (``.cpu()``, ``.double()``, ...)."""
        return dataclasses.replace(
            self,
            recon=fn(self.recon),
            kl_top=fn(self.kl_top),
            kl_layers=fn(self.kl_layers),
            layers={k: fn(v) for k, v in self.layers.items()},
        )

    @staticmethod
    def cat(bounds: Iterable[Bound]) -> Bound:
        """One Bound over the examples of several (batches of one data set, in order)."""
        bounds = list(bounds)
        if not bounds:
            raise ValueError("Bound.cat needs at least one Bound, got none")
        first = bounds[0]

        def cat(get):
            return torch.cat([torch.as_tensor(get(b)).expand(len(b)) for b in bounds])

        return Bound(
            recon=cat(lambda b: b.recon),
            kl_top=cat(lambda b: b.kl_top),
            kl_layers=cat(lambda b: b.kl_layers),
            layers={k: cat(lambda b, k=k: b.layers[k]) for k in first.layers},
            dim=first.dim,
            closed_form=first.closed_form,
        )

    def __len__(self) -> int:
        shapes = [t.shape for t in (self.recon, self.kl_top, self.kl_layers, *self.layers.values())]
        return torch.broadcast_shapes(*shapes).numel()


def bound_terms(recon: float, kl_top: float, kl_layers: float | None = None, dim: int | None = None) -> dict:
    """The named terms of one bound: ``recon``, ``kl_top``, ``kl_layers`` (when
    the model has layers below the top), ``elbo`` and, given the data's
    dimension ``dim`` (for a likelihood that is a probability mass function),
    ``bpd``."""
    terms = {"recon": recon, "kl_top": kl_top}
    if kl_layers is not None:
        terms["kl_layers"] = kl_layers
    terms["elbo"] = recon - kl_top - (kl_layers or 0.0)
    if dim is not None:
        terms["bpd"] = bits_per_dim(-terms["elbo"], dim)
    return terms


def prefixed(terms: dict, prefix: str) -> dict:
    """``{"elbo": v}`` -> ``{"test_elbo": v}`` for ``prefix="test"``."""
    return {f"{prefix}_{name}": value for name, value in terms.items()}


def metric_unit(name: str) -> str:
    """The unit of a metrics.csv column, so that plots put each unit on its own
    axis: bits per dimension (``*_bpd``), the training loss of an objective that
    is not a bound (``train_loss_*``, in that objective's own units), or nats
    per example (the bound's terms, ``*_elbo``, ``*_iwae``)."""
    if name.endswith("_bpd"):
        return "bits per dimension"
    if "_loss" in name:
        return "training loss (the objective's units, not a bound)"
    return "nats per example"
