"""The Gaussian KL, :func:`normal_kl`, written once for every model (the
diffusion chain's per-step and prior terms, VDM's prior term, the registered
KLs below), and the closed-form KL divergences that torch does not register.

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


def normal_kl(mean_diff, log_var_q, log_var_p=None, event_size: int | None = None, mean_scale=None):
    """KL(N(m_q, diag exp(log_var_q)) || N(m_p, diag exp(log_var_p))), the library's one Gaussian KL:

        0.5 sum_d [log_var_p - log_var_q + exp(log_var_q - log_var_p) - 1 + (m_q - m_p)^2 exp(-log_var_p)]

    :param mean_diff: m_q - m_p, shape ``batch_shape + (D,)``; or, with
        ``mean_scale`` (shape ``batch_shape``, or a number), m_q - m_p =
        mean_scale * mean_diff, the factor applied once per example where the
        variance is shared instead of to each of the D elements.
    :param log_var_q: ``batch_shape + (D,)``, or ``batch_shape + (1,)`` (or a
        number) for one variance shared by the D elements, whose terms are then
        computed once, not D times. Where both log-variances are numbers (or
        ``None``), their term is computed in float64 as (expm1(u) - u) / 2,
        u = log_var_q - log_var_p, exact however close the variances.
    :param log_var_p: as ``log_var_q``; ``None`` for unit variances (p = N(m_p, I)),
        whose terms are left out (they are exact zeros). The same tensor as
        ``log_var_q``: equal variances, whose part of the KL is zero and skipped.
    :param event_size: D, to sum over the event (returns ``batch_shape``);
        ``None`` for the elementwise KL (returns the broadcast shape of the arguments).
    """
    numbers = not (torch.is_tensor(log_var_q) or torch.is_tensor(log_var_p))
    exp = math.exp if numbers else torch.exp
    if log_var_q is log_var_p:
        var_part = None
    elif numbers:
        # constants (a schedule's), once per call in float64, with expm1: exp(u) - 1 cancels to
        # nothing where the variances are close (KL(q(x_T|x_0) || N(0, I)): u = log(1 - alpha_bar_T))
        u = log_var_q - (log_var_p or 0.0)
        var_part = 0.5 * (math.expm1(u) - u)
    elif log_var_p is None:
        var_part = 0.5 * (-1.0 - log_var_q + exp(log_var_q))
    else:
        var_part = 0.5 * (-1.0 + log_var_p - log_var_q + exp(log_var_q - log_var_p))
    if event_size is None:
        d = mean_diff if mean_scale is None else mean_scale * mean_diff
        mean_part = 0.5 * (d.square() if log_var_p is None else d.square() * exp(-log_var_p))
        return mean_part if var_part is None else var_part + mean_part
    if var_part is not None:
        shared = not torch.is_tensor(var_part) or var_part.dim() == 0
        var_part = var_part * event_size if shared else var_part.sum(-1) * (event_size / var_part.shape[-1])
    if log_var_p is None or not torch.is_tensor(log_var_p) or log_var_p.shape[-1] == 1:
        # one variance of p per example: weigh the squared distance once
        weight = 0.5 if mean_scale is None else 0.5 * mean_scale**2
        if log_var_p is not None:
            weight = weight * exp(-(log_var_p.squeeze(-1) if torch.is_tensor(log_var_p) else log_var_p))
        mean_part = weight * torch.linalg.vecdot(mean_diff, mean_diff)
    else:
        d = mean_diff if mean_scale is None else mean_scale.unsqueeze(-1) * mean_diff
        mean_part = 0.5 * (d.square() * torch.exp(-log_var_p)).sum(-1)
    return mean_part if var_part is None else var_part + mean_part


def kl_gaussian_diagonal_normal(q, p: Independent) -> torch.Tensor:
    """KL(q || p) for a Gaussian q = N(mu, Sigma) and p = N(m, diag(s^2)): the
    KL from q's diagonal, :func:`normal_kl`, plus what q's correlations add,

        KL(q || p) = KL(N(mu, diag Sigma) || p) + (sum_i log Sigma_ii - log det Sigma) / 2,

    with log det Sigma read from q's entropy.
    """
    if not isinstance(p.base_dist, Normal) or p.reinterpreted_batch_ndims != 1:
        raise NotImplementedError
    log_var_q = q.variance.log()
    D = log_var_q.shape[-1]
    log_det = 2 * q.entropy() - D * (1 + math.log(2 * math.pi))
    diagonal = normal_kl(q.loc - p.base_dist.loc, log_var_q, 2 * p.base_dist.scale.log(), D)
    return diagonal + 0.5 * (log_var_q.sum(-1) - log_det)


register_kl(LowRankMultivariateNormal, Independent)(kl_gaussian_diagonal_normal)
register_kl(MultivariateNormal, Independent)(kl_gaussian_diagonal_normal)


@register_kl(Normal, StandardNormal)
def kl_normal_standard_normal(q: Normal, p: StandardNormal) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) elementwise (:func:`normal_kl` with p's unit
    variance left out), with the batch shape of q and p broadcast together."""
    kl = normal_kl(q.loc, 2 * q.scale.log())
    return kl if p.batch_shape == q.batch_shape else kl.expand(torch.broadcast_shapes(q.batch_shape, p.batch_shape))


def has_closed_form_kl(q, p) -> bool:
    """Whether ``kl_divergence(q, p)`` is registered (an ELBO that asks for it gets
    the closed form) rather than raising ``NotImplementedError`` (Monte Carlo)."""
    try:
        torch.distributions.kl_divergence(q, p)
    except NotImplementedError:
        return False
    return True
