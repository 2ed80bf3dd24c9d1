"""Optimisers and learning-rate schedules: one torch optimiser over all of a
model's parameters, as a hand-written PyTorch loop has.

:func:`make_optimizer` and :func:`make_scheduler` are what the trainer steps.
"""

from __future__ import annotations

import inspect
import math

import torch
from pyro.optim.clipped_adam import ClippedAdam

# Pyro's ClippedAdam is a torch optimiser too (one instance over all parameters);
# it clamps each gradient entry to [-10, 10] before its Adam update.
OPTIMIZERS = {"adam": torch.optim.Adam, "clippedadam": ClippedAdam}
LR_SCHEDULES = ("constant", "cosine", "exponential")


def fast_adam_args(params: list, cls=torch.optim.Adam) -> dict:
    """The fastest implementation ``cls`` offers for ``params``: ``fused=True``
    where every parameter is on a device with a fused kernel (CUDA and, in
    recent torch, CPU), else the multi-tensor ``foreach=True``; nothing for an
    optimiser without either (``ClippedAdam``)."""
    accepted = inspect.signature(cls).parameters
    if "fused" in accepted and params and all(p.is_floating_point() and p.device.type in _fused_devices() for p in params):
        return {"fused": True}
    if "foreach" in accepted:
        return {"foreach": True}
    return {}


def _fused_devices() -> tuple:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return tuple(_get_fused_kernels_supported_devices())


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """One ``OPTIMIZERS[name]`` over all of ``params``, in its fastest form (:func:`fast_adam_args`)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    params = list(params)
    return OPTIMIZERS[name](params, lr=lr, **fast_adam_args(params, OPTIMIZERS[name]))


def lr_factor(k: int, steps_per_epoch: int, epochs: int, schedule: str = "constant", warmup_steps: int = 0, gamma: float = 1.0) -> float:
    """lr_k / lr at optimiser step k (from 0): warmup(k) * schedule(k), with
    warmup(k) = min(1, (k + 1) / warmup_steps), and schedule(k) = 1
    (constant), (1 + cos(pi k / K)) / 2 over the run's K steps (cosine), or
    gamma ** (k / steps_per_epoch) (exponential)."""
    warmup = min(1.0, (k + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "cosine":
        total = epochs * steps_per_epoch
        return warmup * 0.5 * (1 + math.cos(math.pi * min(k, total) / total))
    if schedule == "exponential":
        return warmup * gamma ** (k / steps_per_epoch)
    return warmup


def make_scheduler(optimizer: torch.optim.Optimizer, cfg, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` stepped once per optimiser step with :func:`lr_factor` of the config's schedule."""
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k, steps_per_epoch, cfg.epochs, cfg.lr_schedule, cfg.warmup_steps, cfg.lr_gamma)
    )
