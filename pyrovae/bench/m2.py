"""The ``m2`` workload: one training step of the semi-supervised VAE (M2,
:class:`pyrovae.ssvae.SSVAE`) on a batch of labelled and unlabelled images,
against a hand-written PyTorch M2 step (its floor) and Pyro's ``TraceEnum_ELBO``.

The floor sums the K classes by hand, batched: the encoder and decoder see all
K copies of the unlabelled examples at once, shape ``(K, B_u, .)``, as the
enumerated guide does; every KL is the closed form the analytic ELBO takes."""

from __future__ import annotations

import math

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceEnum_ELBO

from pyrovae.bench.floors import fast_adam
from pyrovae.bench.harness import FLOOR, TRAINER, Case, Sizes, _bind
from pyrovae.infer import TraceAnalyticKL_ELBO
from pyrovae.parts.encoders import MIN_SCALE
from pyrovae.ssvae import SSVAE, SemiSupervisedLoss, pack_labels, unpack_labels

SVI_ANALYTIC = "SVI, pyrovae TraceAnalyticKL_ELBO (y summed)"
SVI_ENUM = "SVI, TraceEnum_ELBO (y summed, KL sampled)"
TRAINER_ENUM = "pyrovae trainer step, TraceEnum_ELBO"


def _branch_bound(m2: SSVAE, x: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """L(x, y) = log p(x|y,z) - KL(q(z|x,y) || N(0, I)) + log p(y) for one draw
    of z per example, shape ``x.shape[:-1]``; ``onehot`` broadcasts against x."""
    batch = torch.broadcast_shapes(x.shape[:-1], onehot.shape[:-1])
    onehot = onehot.expand(*batch, m2.num_classes)
    loc, raw_scale = m2.encoder.net(torch.cat([x.expand(*batch, x.shape[-1]), onehot], -1)).split(m2.z_dim, dim=-1)
    scale = F.softplus(raw_scale) + MIN_SCALE
    z = loc + scale * torch.randn_like(loc)
    logits = m2.decoder(torch.cat([z, onehot], -1))
    log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
    kl = 0.5 * (loc**2 + scale**2 - 1).sum(-1) - scale.log().sum(-1)
    # p(y) uniform, as SSVAE's class_logits
    return log_lik - kl - math.log(m2.num_classes)


def m2_torch_loss(m2: SSVAE, batch: torch.Tensor) -> torch.Tensor:
    """The floor's loss of ``batch = pack_labels(x, y)`` (y = -1 unlabelled),
    :class:`~pyrovae.ssvae.SemiSupervisedLoss`'s loss in plain torch,

        -sum_u sum_y q(y|x_u) [L(x_u, y) - log q(y|x_u)] - sum_l [L(x_l, y_l) + alpha log q(y_l|x_l)],

    the unlabelled examples first (the K classes as a leading dimension of
    size K, drawing z for all of them at once), then the labelled, drawing in
    the order the library does."""
    x, y = unpack_labels(batch)
    labelled = y >= 0
    eye = torch.eye(m2.num_classes, dtype=x.dtype, device=x.device)
    loss = x.new_zeros(())
    if not bool(labelled.all()):
        x_u = x[~labelled]
        log_q = m2.classifier(x_u).log_softmax(-1)  # (B_u, K)
        bound = _branch_bound(m2, x_u, eye[:, None, :])  # (K, B_u)
        loss = loss - (log_q.exp() * (bound.T - log_q)).sum()
    if bool(labelled.any()):
        x_l, y_l = x[labelled], y[labelled]
        log_q = m2.classifier(x_l).log_softmax(-1)
        aux = m2.aux_weight * log_q.gather(-1, y_l[:, None]).sum()
        loss = loss - _branch_bound(m2, x_l, eye[y_l]).sum() - aux
    return loss


def m2_torch_step(m2: SSVAE, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """The floor: one Adam step on :func:`m2_torch_loss`."""
    optimizer.zero_grad(set_to_none=True)
    loss = m2_torch_loss(m2, batch)
    loss.backward()
    optimizer.step()
    return loss.item()


def m2_batch(sizes: Sizes, device: torch.device, num_classes: int = 10) -> torch.Tensor:
    """Binary images, the first eighth of the batch labelled (at least one)."""
    from math import prod

    batch = sizes.vae_batches[-1]
    x = torch.bernoulli(torch.full((batch, prod(sizes.image_shape)), 0.3, device=device))
    y = torch.full((batch,), -1, device=device)
    n_labelled = max(1, batch // 8)
    y[:n_labelled] = torch.randint(0, num_classes, (n_labelled,), device=device)
    return pack_labels(x, y)


def m2_cases(sizes: Sizes, device: torch.device):
    """One M2 step at the VAE's sizes (hidden ``sizes.vae_hidden``, z
    ``sizes.vae_z_dim``, 10 classes, the VAE's largest batch, an eighth of it
    labelled): the trainer's step and SVI with the enumerated analytic ELBO
    (the targets), the same with ``TraceEnum_ELBO``, and the torch floor."""
    from pyrovae.bench.cases import trainer_step

    pyro.clear_param_store()
    batch = m2_batch(sizes, device)
    m2 = SSVAE(batch.shape[1] - 1, 10, sizes.vae_z_dim, sizes.vae_hidden).to(device)
    analytic = SemiSupervisedLoss(TraceAnalyticKL_ELBO(max_plate_nesting=1))
    enum = SemiSupervisedLoss(TraceEnum_ELBO(max_plate_nesting=1))
    variants = {
        FLOOR: _bind(m2_torch_step, m2, fast_adam(m2, 1e-3), batch),
        TRAINER: _bind(trainer_step(m2, analytic), batch),
        SVI_ANALYTIC: _bind(
            SVI(m2.model, m2.guide, pyro.optim.Adam({"lr": 1e-3}), loss=analytic.differentiable_loss).step, batch
        ),
        TRAINER_ENUM: _bind(trainer_step(m2, enum), batch),
        SVI_ENUM: _bind(
            SVI(m2.model, m2.guide, pyro.optim.Adam({"lr": 1e-3}), loss=enum.differentiable_loss).step, batch
        ),
    }
    n_labelled = int((batch[:, -1] >= 0).sum())
    yield Case(
        "m2",
        f"batch {len(batch)} ({n_labelled} labelled)",
        variants,
        {TRAINER: 1.15, SVI_ANALYTIC: 1.15},
        {"batch": len(batch), "labelled": n_labelled},
    )
