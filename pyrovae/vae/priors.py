"""Priors p(z): modules whose ``forward()`` returns a Pyro distribution with
``batch_shape == ()`` and ``event_shape == (z_dim,)``.

Any ``nn.Module`` with that contract can be passed to :class:`~pyrovae.vae.VAE`;
parameters it owns are trained with the rest of the model.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


class StandardNormalPrior(nn.Module):
    """p(z) = N(z; 0, I). Its loc and scale are buffers, so ``.to(device)`` moves them."""

    def __init__(self, z_dim: int):
        super().__init__()
        if z_dim < 1:
            raise ValueError(f"z_dim must be >= 1, got {z_dim}")
        self.z_dim = z_dim
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)
