"""Encoders q_phi(z|x): modules mapping a batch ``x`` of shape ``(B, x_dim)`` to a
Pyro distribution with ``batch_shape == (B,)`` and ``event_shape == (z_dim,)``.

The VAE's guide samples ``z`` from whatever the encoder returns, so any module
with that contract is a guide. The ones that ship share :class:`Encoder`: a
network maps x to ``out_dim`` numbers and the subclass reads its
distribution's parameters from them. :data:`GUIDES` names them for
``build_vae(guide="iaf")`` and ``--guide iaf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.nn.functional import softplus

from pyrovae.nets import MLP, check_sizes

MIN_SCALE = 1e-4


class Encoder(nn.Module):
    """The shared part of the shipped encoders: ``self.net`` maps ``x (B, x_dim)``
    to ``(B, out_dim)``.

    :param make_net: ``out_dim -> nn.Module`` mapping x to that many numbers (a
        conv network, say); by default an MLP ``x_dim -> hidden -> out_dim``.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        out_dim: int,
        hidden=(400,),
        activation: str = "softplus",
        make_net: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        check_sizes(x_dim=x_dim, z_dim=z_dim)
        self.x_dim, self.z_dim = x_dim, z_dim
        self.net = make_net(out_dim) if make_net is not None else MLP(x_dim, hidden, out_dim, activation)


class DiagonalNormalEncoder(Encoder):
    """q_phi(z|x) = N(z; mu_phi(x), diag(sigma_phi(x)^2)).

    The network outputs ``2 * z_dim`` numbers: mu and a raw scale that
    softplus maps to sigma > 0 (softplus rather than exp keeps early steps
    from overflowing).
    """

    def __init__(self, x_dim: int, z_dim: int, hidden=(400,), activation: str = "softplus", make_net=None):
        super().__init__(x_dim, z_dim, 2 * z_dim, hidden, activation, make_net)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = self.net(x).split(self.z_dim, dim=-1)
        return dist.Normal(loc, softplus(raw_scale) + MIN_SCALE).to_event(1)


class LowRankNormalEncoder(Encoder):
    """q_phi(z|x) = N(z; mu_phi(x), W_phi(x) W_phi(x)^T + diag(d_phi(x))), W of shape
    ``(z_dim, rank)``: correlations between latents at O(z_dim * rank) cost."""

    def __init__(
        self, x_dim: int, z_dim: int, hidden=(400,), activation: str = "softplus", make_net=None, rank: int = 2
    ):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        super().__init__(x_dim, z_dim, z_dim * (2 + rank), hidden, activation, make_net)
        self.rank = rank

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, factor, raw_diag = self.net(x).split([self.z_dim, self.z_dim * self.rank, self.z_dim], dim=-1)
        cov_factor = factor.unflatten(-1, (self.z_dim, self.rank))
        return dist.LowRankMultivariateNormal(loc, cov_factor, softplus(raw_diag) + MIN_SCALE)


class FullNormalEncoder(Encoder):
    """q_phi(z|x) = N(z; mu_phi(x), L_phi(x) L_phi(x)^T), L lower triangular with a
    positive diagonal (softplus) and off-diagonal entries the network's outputs
    over sqrt(z_dim): every covariance, at O(z_dim^2) outputs."""

    def __init__(self, x_dim: int, z_dim: int, hidden=(400,), activation: str = "softplus", make_net=None):
        super().__init__(x_dim, z_dim, z_dim + z_dim * (z_dim + 1) // 2, hidden, activation, make_net)
        self.register_buffer("tril_index", torch.tril_indices(z_dim, z_dim), persistent=False)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, entries = self.net(x).split([self.z_dim, self.z_dim * (self.z_dim + 1) // 2], dim=-1)
        rows, cols = self.tril_index
        diagonal = rows == cols
        # row i of L has i off-diagonal entries: scaling them by 1/sqrt(z_dim) keeps
        # Var(z_i) = sum_j L_ij^2 of order one at initialisation, as for the diagonal guide
        entries = torch.where(diagonal, softplus(entries) + MIN_SCALE, entries / math.sqrt(self.z_dim))
        scale_tril = entries.new_zeros(*entries.shape[:-1], self.z_dim, self.z_dim)
        scale_tril[..., rows, cols] = entries
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)


class IAFEncoder(Encoder):
    """Inverse autoregressive flow (Kingma et al. 2016): z_0 ~ N(mu_phi(x),
    diag(sigma_phi(x)^2)), then ``num_flows`` steps

        z_t = s_t * z_{t-1} + (1 - s_t) * m_t,   [m_t, s_t] = AR-NN_t(z_{t-1}, h_phi(x)),

    with s_t = sigmoid(. + 2) (the paper's numerically stable update) and each
    AR-NN autoregressive in z, so log q(z_T|x) = log q(z_0|x) - sum_t sum_i log s_t,i
    costs one pass per step. The context h_phi(x) (``context_dim`` numbers)
    comes from the same network as mu and sigma. Successive steps use reversed
    variable orders.

    Sampling and scoring the sampled z are cheap; scoring a z the encoder did not
    draw (a VampPrior built on this encoder does) inverts each step, ``z_dim``
    passes.
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int,
        hidden=(400,),
        activation: str = "softplus",
        make_net=None,
        num_flows: int = 2,
        context_dim: int | None = None,
        flow_hidden: int | None = None,
    ):
        if num_flows < 1:
            raise ValueError(f"num_flows must be >= 1, got {num_flows}")
        context_dim = context_dim or z_dim
        super().__init__(x_dim, z_dim, 2 * z_dim + context_dim, hidden, activation, make_net)
        self.context_dim = context_dim
        order = torch.arange(z_dim)
        self.flows = nn.ModuleList(
            ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(
                    z_dim,
                    context_dim,
                    [flow_hidden or 3 * z_dim + 1],
                    permutation=order if t % 2 == 0 else order.flip(0),
                ),
                stable=True,
            )
            for t in range(num_flows)
        )

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, raw_scale, context = self.net(x).split([self.z_dim, self.z_dim, self.context_dim], dim=-1)
        base = dist.Normal(loc, softplus(raw_scale) + MIN_SCALE).to_event(1)
        return dist.TransformedDistribution(base, [flow.condition(context) for flow in self.flows])


GUIDES = {
    "diag": DiagonalNormalEncoder,
    "lowrank": LowRankNormalEncoder,
    "full": FullNormalEncoder,
    "iaf": IAFEncoder,
}
"""Encoder classes by name; each takes ``(x_dim, z_dim, hidden, activation, make_net)``."""
