"""Objectives that know their model's structure and are written as one
differentiable loss (the chain's and VDM's ELBOs, L_simple, the hybrid loss)."""

from __future__ import annotations

import torch
from pyro.util import warn_if_nan


class DifferentiableLossMixin:
    """``loss`` and ``loss_and_grads``, as ``pyro.infer.SVI`` calls them, from the
    subclass's ``differentiable_loss(model, guide, *args)``: the value is the
    loss evaluated without gradients, the gradients those of one backward pass."""

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The objective's value, summed over the batch."""
        with torch.no_grad():
            loss = self.differentiable_loss(model, guide, *args, **kwargs).item()
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        loss = loss.item()
        warn_if_nan(loss, "loss")
        return loss
