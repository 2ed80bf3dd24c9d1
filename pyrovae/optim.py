"""Optimisers and learning-rate schedules: one torch optimiser over all of a
model's parameters, as a hand-written PyTorch loop has.

:func:`make_optimizer` and :func:`make_scheduler` are what the trainer steps;
:class:`MultiTensorOptim` (spelled :func:`Adam` like ``pyro.optim.Adam``) is
the same single optimiser behind ``pyro.optim``'s interface, for ``SVI``.
"""

from __future__ import annotations

import copy
import inspect
import math

import pyro
import torch
from pyro.optim import PyroOptim
from pyro.optim.clipped_adam import ClippedAdam

from pyrovae.registry import lookup

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
    if (
        "fused" in accepted
        and params
        and all(p.is_floating_point() and p.device.type in _fused_devices() for p in params)
    ):
        return {"fused": True}
    if "foreach" in accepted:
        return {"foreach": True}
    return {}


def _fused_devices() -> tuple:
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return tuple(_get_fused_kernels_supported_devices())


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """One ``OPTIMIZERS[name]`` over all of ``params``, in its fastest form (:func:`fast_adam_args`)."""
    optimizer = lookup("optimizer", name, OPTIMIZERS)
    params = list(params)
    return optimizer(params, lr=lr, **fast_adam_args(params, optimizer))


def lr_factor(
    k: int, steps_per_epoch: int, epochs: int, schedule: str = "constant", warmup_steps: int = 0, gamma: float = 1.0
) -> float:
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
    lookup("lr_schedule", cfg.lr_schedule, LR_SCHEDULES)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: lr_factor(k, steps_per_epoch, cfg.epochs, cfg.lr_schedule, cfg.warmup_steps, cfg.lr_gamma)
    )


class MultiTensorOptim(PyroOptim):
    """``pyro.optim``'s interface with one torch optimiser over every parameter
    it has seen, for users' own ``SVI`` loops::

        svi = SVI(vae.model, vae.guide, pyrovae.optim.Adam({"lr": 1e-3}), Trace_ELBO())

    ``pyro.optim.Adam`` keeps one torch optimiser (and its own step) *per
    parameter tensor*; this class keeps one multi-tensor (``foreach``, or
    ``fused`` where the device has it) optimiser, adding the parameters of
    each call it has not seen as a new param group, so a step is one kernel
    launch per state tensor instead of one Python loop iteration per
    parameter. After its step it sets the gradients of the parameters it
    stepped to ``None``: ``SVI``'s ``zero_grads`` then allocates nothing, and
    the next backward pass writes fresh gradients. A parameter without a
    gradient this step is skipped (torch's optimisers skip ``grad=None``).

    :meth:`get_state` / :meth:`set_state` (and ``save`` / ``load``) hold the
    torch optimiser's state dict with the param-store names of each group's
    parameters, so a state restored before the parameters exist again is
    applied when they are next seen (as ``pyro.optim`` does).
    """

    def __init__(self, optim_constructor=torch.optim.Adam, optim_args: dict | None = None):
        if not (isinstance(optim_constructor, type) and issubclass(optim_constructor, torch.optim.Optimizer)):
            raise TypeError(f"optim_constructor must be a torch.optim.Optimizer class, got {optim_constructor!r}")
        optim_args = {"lr": 1e-3} if optim_args is None else dict(optim_args)
        if not isinstance(optim_args, dict):
            raise TypeError(f"optim_args must be a dict of the optimiser's arguments, got {type(optim_args).__name__}")
        super().__init__(optim_constructor, optim_args)
        self.optimizer: torch.optim.Optimizer | None = None
        self._seen: set = set()
        self._pending: dict | None = None  # a set_state waiting for its parameters

    def __call__(self, params, *args, **kwargs) -> None:
        params = list(params)
        new = [p for p in params if p not in self._seen]
        if new:
            self._add(new)
        self.optimizer.step()
        for p in params:
            p.grad = None

    def _add(self, new: list) -> None:
        self._seen.update(new)
        if self.optimizer is None:
            self.optimizer = self.pt_optim_constructor(
                new, **self.pt_optim_args, **fast_adam_args(new, self.pt_optim_constructor)
            )
        else:
            self.optimizer.add_param_group({"params": new})
        if self._pending is not None:
            self._apply_pending()

    def _names(self) -> list:
        store = pyro.get_param_store()
        return [[store.param_name(p) for p in group["params"]] for group in self.optimizer.param_groups]

    def get_state(self) -> dict:
        """``{"optimizer": state_dict, "names": param-store names per group}``
        (``{}`` before the first step): a copy, which later steps leave as it is."""
        if self.optimizer is None:
            return copy.deepcopy(self._pending or {})
        return copy.deepcopy({"optimizer": self.optimizer.state_dict(), "names": self._names()})

    def set_state(self, state_dict: dict) -> None:
        """Restore :meth:`get_state`'s result: now, for the parameters in
        Pyro's param store, else when they are first stepped."""
        if not state_dict:
            return
        if set(state_dict) != {"optimizer", "names"}:
            raise ValueError(
                f"state_dict must have keys 'optimizer' and 'names' (from get_state), got {sorted(state_dict)}"
            )
        self._pending = state_dict
        store = pyro.get_param_store()
        names = [n for group in state_dict["names"] for n in group]
        if self.optimizer is None and all(n in store for n in names):
            groups = [[store._params[n] for n in group] for group in state_dict["names"]]
            for group in groups:
                self._seen.update(group)
                if self.optimizer is None:
                    self.optimizer = self.pt_optim_constructor(
                        group, **self.pt_optim_args, **fast_adam_args(group, self.pt_optim_constructor)
                    )
                else:
                    self.optimizer.add_param_group({"params": group})
        if self.optimizer is not None:
            self._apply_pending()

    def _apply_pending(self) -> None:
        if self._names() == self._pending["names"]:
            self.optimizer.load_state_dict(self._pending["optimizer"])
            self._pending = None


def Adam(optim_args: dict | None = None) -> MultiTensorOptim:
    """``pyro.optim.Adam``'s spelling for :class:`MultiTensorOptim` over ``torch.optim.Adam``."""
    return MultiTensorOptim(torch.optim.Adam, optim_args)
