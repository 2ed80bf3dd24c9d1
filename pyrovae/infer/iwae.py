"""Importance-weighted estimate of log p_theta(x) (Burda, Grosse & Salakhutdinov, 2016).

For each example x, with z_1..z_k ~ q_phi(z|x) independently,

    log w_i = log p_theta(x, z_i) - log q_phi(z_i|x),
    L_k(x)  = log (1/k) sum_i w_i = logsumexp_i(log w_i) - log k,

E[L_1] is the ELBO, E[L_k] <= E[L_{k+1}] <= log p_theta(x), and L_k -> log p_theta(x)
as k grows. The k draws are vectorised with an outer ``pyro.plate`` and taken in
chunks so that memory stays bounded for large k.

Pyro's ``vectorized_importance_weights`` sums the log-weights over the data
plate (one importance sampler for the whole batch); here each example keeps its
own weights, so the bound is per image and then averaged.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyrovae.infer.bound import bits_per_dim

PARTICLES = "iwae_particles"


def log_importance_weights(model, guide, x: torch.Tensor, num_samples: int, *args) -> torch.Tensor:
    """log w = log p(x, z) - log q(z|x) for ``num_samples`` draws z ~ q per example,
    shape ``(num_samples, B)``; ``args`` go to both after x (a conditional
    model's y, one per example: then the weights are of log p(x | y)).

    ``model(x)`` and ``guide(x)`` must put every sample site in one plate over
    the ``B`` examples at dim -1 (the VAE's ``"data"`` plate) and use no other
    plate; the draws are a plate at dim -2. Differentiable (an IWAE objective
    can be built on it).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    batch = x.shape[0]
    with pyro.plate(PARTICLES, num_samples, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x, *args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, *args)
    # the plates' own subsample sites carry no probability
    model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    log_w = x.new_zeros(num_samples, batch)
    for sign, trace in ((1, model_trace), (-1, guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["log_prob"].shape != (num_samples, batch):
                raise ValueError(
                    f"site {name!r} has log_prob shape {tuple(site['log_prob'].shape)}, expected "
                    f"({num_samples}, {batch}): every sample site must lie in one plate over the examples at dim -1"
                )
            log_w = log_w + sign * site["log_prob"]
    return log_w


@torch.no_grad()
def iwae_log_likelihood(
    model, guide, x: torch.Tensor, num_samples: int, chunk_size: int = 100, y: torch.Tensor | None = None
) -> torch.Tensor:
    """L_k(x) for each example, shape ``(B,)``: the log-weights of ``num_samples``
    draws, computed ``chunk_size`` draws at a time, then a logsumexp over the
    draws; with ``y`` (one per example), L_k of log p(x | y)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    chunks = [
        log_importance_weights(model, guide, x, min(chunk_size, num_samples - start), *(() if y is None else (y,)))
        for start in range(0, num_samples, chunk_size)
    ]
    return torch.logsumexp(torch.cat(chunks), dim=0) - math.log(num_samples)


def evaluate_iwae(
    model,
    guide,
    x: torch.Tensor,
    num_samples: int,
    batch_size: int = 100,
    chunk_size: int = 100,
    y: torch.Tensor | None = None,
) -> dict:
    """The mean over the examples of L_k(x) (of log p(x | y) given ``y``, one
    per example) in nats, and as bits per dimension, ``-L_k / (D ln 2)`` with
    D = ``x.shape[-1]``: ``{"iwae": ..., "iwae_bpd": ...}``.

    Memory is bounded by ``batch_size * chunk_size`` likelihood evaluations at a time.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = sum(
        iwae_log_likelihood(
            model, guide, x[i : i + batch_size], num_samples, chunk_size, None if y is None else y[i : i + batch_size]
        )
        .sum()
        .item()
        for i in range(0, len(x), batch_size)
    )
    mean = total / len(x)
    return {"iwae": mean, "iwae_bpd": bits_per_dim(-mean, x.shape[-1])}


@torch.no_grad()
def class_marginal_iwae(
    model, guide, x: torch.Tensor, y: torch.Tensor, num_samples: int, num_classes: int, batch_size: int = 100
) -> dict:
    """A model of p(x | y) over ``num_classes`` classes judged as a model of x:
    with p(y) uniform, its own marginal log p(x) = log (1/K) sum_c p(x | c),
    each p(x | c) by IWAE-k (``num_samples``), so a lower-bound estimate;
    log p(y | x) = log p(x | y) + log(1/K) - log p(x) at the labels ``y``
    (at most 0, so log p(x | y) - log p(x) <= log K for the model's own
    marginal); and the share of examples whose argmax_c p(x | c) is their
    label (the model as a Bayes classifier). Means over the examples:
    ``{"iwae_marginal", "log_p_y_given_x", "bayes_accuracy"}``. Costs K IWAE-k
    evaluations."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")

    def given(c: int) -> torch.Tensor:  # L_k(x | c) for every example
        label = torch.full((len(x),), c, dtype=torch.long, device=x.device)
        parts = zip(x.split(batch_size), label.split(batch_size))
        return torch.cat([iwae_log_likelihood(model, guide, part, num_samples, y=y_c) for part, y_c in parts])

    per_class = torch.stack([given(c) for c in range(num_classes)], -1)  # (N, K)
    log_px = torch.logsumexp(per_class, -1) - math.log(num_classes)
    log_py_x = per_class.gather(-1, y.long()[:, None])[:, 0] - math.log(num_classes) - log_px
    return {
        "iwae_marginal": float(log_px.mean()),
        "log_p_y_given_x": float(log_py_x.mean()),
        "bayes_accuracy": float((per_class.argmax(-1) == y).double().mean()),
    }
