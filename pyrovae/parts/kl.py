"""Closed-form KL divergences that torch does not register.

Importing this module registers KL(q || p) for a Normal q against the
standard normal p (:class:`~pyrovae.parts.priors.StandardNormal`, the default
prior's) and for a low-rank or full-covariance
multivariate Normal guide q against a diagonal Normal prior
p = ``Normal(loc, scale).to_event(1)``, so that an ELBO which asks
``kl_divergence`` (``TraceMeanField_ELBO``, the analytic-KL ELBO) uses the
closed form for these guides too. Any other ``Independent`` prior raises
``NotImplementedError``, which those ELBOs take as "estimate by Monte Carlo".
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Independent, LowRankMultivariateNormal, MultivariateNormal, Normal, register_kl

from pyrovae.parts.priors import StandardNormal


def kl_gaussian_diagonal_normal(q, p: Independent) -> torch.Tensor:
    """KL(q || p) for a Gaussian q = N(mu, Sigma) and p = N(m, diag(s^2)):

        KL = H(q, p) - H(q),   H(q, p) = sum_i [log s_i + log(2 pi) / 2 + (Sigma_ii + (mu_i - m_i)^2) / (2 s_i^2)],

    which needs only the diagonal of Sigma (``q.variance``) and q's entropy.
    """
    if not isinstance(p.base_dist, Normal) or p.reinterpreted_batch_ndims != 1:
        raise NotImplementedError
    loc, scale = p.base_dist.loc, p.base_dist.scale
    cross_entropy = scale.log() + 0.5 * math.log(2 * math.pi) + (q.variance + (q.loc - loc) ** 2) / (2 * scale**2)
    return cross_entropy.sum(-1) - q.entropy()


register_kl(LowRankMultivariateNormal, Independent)(kl_gaussian_diagonal_normal)
register_kl(MultivariateNormal, Independent)(kl_gaussian_diagonal_normal)


@register_kl(Normal, StandardNormal)
def kl_normal_standard_normal(q: Normal, p: StandardNormal) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) = (mu^2 + sigma^2 - 1) / 2 - log sigma,
    elementwise, with the batch shape of q and p broadcast together."""
    kl = 0.5 * (q.loc.square() + q.scale.square() - 1) - q.scale.log()
    return kl if p.batch_shape == q.batch_shape else kl.expand(torch.broadcast_shapes(q.batch_shape, p.batch_shape))


def has_closed_form_kl(q, p) -> bool:
    """Whether ``kl_divergence(q, p)`` is registered (an ELBO that asks for it gets
    the closed form) rather than raising ``NotImplementedError`` (Monte Carlo)."""
    try:
        torch.distributions.kl_divergence(q, p)
    except NotImplementedError:
        return False
    return True
