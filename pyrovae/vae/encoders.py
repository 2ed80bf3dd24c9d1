"""Encoders q_phi(z|x): modules mapping a batch ``x`` of shape ``(B, x_dim)`` to a
Pyro distribution with ``batch_shape == (B,)`` and ``event_shape == (z_dim,)``.

The VAE's guide samples ``z`` from whatever the encoder returns, so any module
with that contract is a guide.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn.functional import softplus

from pyrovae.nets import MLP

MIN_SCALE = 1e-4


class DiagonalNormalEncoder(nn.Module):
    """q_phi(z|x) = N(z; mu_phi(x), diag(sigma_phi(x)^2)).

    One network ``net`` outputs ``2 * z_dim`` numbers: mu and a raw scale that
    softplus maps to sigma > 0 (softplus rather than exp keeps early steps
    from overflowing).
    """

    def __init__(self, x_dim: int, z_dim: int, hidden=(400,), activation: str = "softplus", net: nn.Module | None = None):
        super().__init__()
        if z_dim < 1:
            raise ValueError(f"z_dim must be >= 1, got {z_dim}")
        self.x_dim, self.z_dim = x_dim, z_dim
        self.net = net if net is not None else MLP(x_dim, hidden, 2 * z_dim, activation)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = self.net(x).split(self.z_dim, dim=-1)
        return dist.Normal(loc, softplus(raw_scale) + MIN_SCALE).to_event(1)
