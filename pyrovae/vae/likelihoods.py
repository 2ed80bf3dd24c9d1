"""Likelihoods p_theta(x|z): modules mapping the decoder's output to a Pyro
distribution over a flat ``x`` with ``event_shape == (x_dim,)``."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


class BernoulliLikelihood(nn.Module):
    """p_theta(x|z) = prod_d Bernoulli(x_d; sigmoid(logits_d)); data must be binary."""

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=logits).to_event(1)
