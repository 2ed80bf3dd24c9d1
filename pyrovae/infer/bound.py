"""The bound's vocabulary, the same for every model (VAE, hierarchical VAE,
diffusion chain), per example and in nats:

    recon     = E_q[log p_theta(x | first latent)]      (the chain: the decoder term at t = 1)
    kl_top    = KL(q(top latent | ..) || p(top latent))  (the chain: L_T = KL(q(x_T|x_0) || p(x_T)))
    kl_1..kl_L, and kl_layers = their sum               (the chain: kl_layers = sum_{t=2..T} L_{t-1})
    elbo      = recon - kl_top - kl_layers
    bpd       = -elbo / (D ln 2)                         (bits per dimension, for a pmf likelihood)

``metrics.csv`` carries them with ``train_``/``test_`` prefixes
(``test_elbo``, ``test_bpd``, ...). :func:`bits_per_dim` is the library's one
conversion from nats to bits per dimension.
"""

from __future__ import annotations

import math

TERMS = ("recon", "kl_top", "kl_layers", "elbo", "bpd")


def bits_per_dim(nats, dim: int):
    """``nats / (dim ln 2)``: a negative log-likelihood (or -ELBO) of one
    ``dim``-dimensional example in nats, as bits per dimension. Works on floats
    and tensors alike."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
    return nats / (dim * math.log(2))


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
