"""The interface every diffusion model implements: the discrete chain
(:class:`~pyrovae.diffusion.chain.DiffusionChain`) and the continuous-time or
T-step VDM (:class:`~pyrovae.diffusion.vdm.VDM`), so that samplers, evaluation
and the command line take either without asking which.

Both are hierarchical VAEs with a fixed encoder, written in one vocabulary::

    q(x_t | x_0)                       q_sample(x0, t, noise) = alpha_t x0 + sigma_t noise
    p(x_top) = N(0, I)                 prior: the StandardNormalPrior module
    p_theta(x_s | x_t)                 p_step(x_t, t)
    p_theta(x_0 | least noisy latent)  p_decoder(x)
    KL(q(x_top | x_0) || p(x_top))     prior_kl(x0)
    the bound's named terms            bound(x0) -> Bound (recon, kl_top, kl_layers)

Each model keeps its own time axis ``t``: the chain's integer steps 1..T, VDM's
t in [0, 1] (its T-step model's grid i / T). At a time, a sampler reads the
noise levels (:meth:`DiffusionModel.alpha_sigma`, :meth:`DiffusionModel.log_snr`)
and the network's noise prediction (:meth:`DiffusionModel.predict_eps`); with
them x0_hat = (x_t - sigma_t eps_hat) / alpha_t.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyrovae.checks import check_batch, check_finite
from pyrovae.infer.bound import Bound
from pyrovae.nets import first_parameter

DATA_RANGE = (-1.0, 1.0)
"""Diffusion models' images: 8-bit pixels scaled to [-1, 1], as DDPM does."""


class DiffusionModel(nn.Module):
    """A diffusion model as a Pyro model/guide pair with a fixed encoder (see
    the module docstring). Subclasses set ``x_dim`` (D, the size of a flat
    example), ``T`` (the number of steps, ``None`` in continuous time),
    ``prior`` (a :class:`~pyrovae.parts.priors.StandardNormalPrior`) and
    ``likelihood`` (a module from :mod:`pyrovae.parts.likelihoods` whose scale the
    model gives, ``discrete`` for a probability mass function), and name the
    data in their errors with ``data_name``. The methods that raise
    ``NotImplementedError`` here are what every model defines; the rest
    (``check_data``, ``log_snr``, ``discrete``, ``upgrade_state_dict``) they share."""

    data_name = "x"

    @property
    def discrete(self) -> bool:
        """Whether the decoder is a probability mass function (images), so that
        the bound is on the discrete data's log-probability and converts to bits/dim."""
        return self.likelihood.discrete

    def reference(self) -> torch.Tensor:
        """A tensor of the model's floating dtype and device, parameter or buffer
        (the device the data must be on; where sampling draws its noise)."""
        raise NotImplementedError(f"{type(self).__name__} must define reference()")

    def check_data(self, x: torch.Tensor) -> torch.Tensor:
        """Raise a clear error for data this model cannot score; return ``x`` in
        the dtype of the model's parameters (float64 or half-precision data are cast).
        Shape ``(B >= 1, D)``, the model's device; under ``pyro.enable_validation``
        (a pass over the data each) finite values and, for a discrete decoder,
        values in [-1, 1]."""
        name = self.data_name
        # the parameters' dtype; a model without any (a fixed schedule, an exact denoiser) keeps x's
        param = first_parameter(self)
        device, dtype = (self.reference().device, None) if param is None else (param.device, param.dtype)
        x = check_batch(x, self.x_dim, device, dtype, name, type(self).__name__)
        if is_validation_enabled():
            check_finite(x, name)
            lo, hi = DATA_RANGE
            if self.discrete and (x.min() < lo or x.max() > hi):
                raise ValueError(
                    f"{name} must be 8-bit pixels scaled to [{lo:g}, {hi:g}] for the discretised decoder, "
                    f"got values in [{x.min():.3g}, {x.max():.3g}]"
                )
        return x

    def upgrade_state_dict(self, state: dict) -> dict:
        """``state`` with the prior's buffers, absent from a model saved before it
        held a prior module, filled from this model's own (N(0, I) has nothing
        to learn); :func:`pyrovae.checkpoint.load_model_state` calls it."""
        own = self.state_dict()
        missing = {k: v for k, v in own.items() if k.startswith("prior.") and k not in state}
        return {**state, **missing} if missing else state

    # --- the forward process at a time -------------------------------------------------

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) of q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I), each of ``t``'s shape."""
        raise NotImplementedError(f"{type(self).__name__} must define alpha_sigma()")

    def log_snr(self, t) -> torch.Tensor:
        """lambda_t = log(alpha_t^2 / sigma_t^2), ``t``'s shape."""
        alpha, sigma = self.alpha_sigma(t)
        return 2 * (alpha.log() - sigma.log())

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t noise, ``t`` of the batch shape."""
        raise NotImplementedError(f"{type(self).__name__} must define q_sample()")

    def predict_eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """eps_hat(x_t, t), the network's prediction of the noise in x_t, ``x_t``'s shape
        (``t`` one time or one per entry of the batch shape)."""
        raise NotImplementedError(f"{type(self).__name__} must define predict_eps()")

    # --- the generative model ----------------------------------------------------------

    def p_step(self, x_t: torch.Tensor, t) -> dist.Distribution:
        """p_theta(x_s | x_t) for the step from ``t`` to the time before it."""
        raise NotImplementedError(f"{type(self).__name__} must define p_step()")

    def p_decoder(self, x: torch.Tensor) -> dist.Distribution:
        """p_theta(x_0 | the least noisy latent): the likelihood, a distribution over
        the data with event shape ``(D,)``."""
        raise NotImplementedError(f"{type(self).__name__} must define p_decoder()")

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """``kl_top`` = KL(q(top latent | x_0) || p(top latent)) in closed form, ``x0.shape[:-1]``."""
        raise NotImplementedError(f"{type(self).__name__} must define prior_kl()")

    def bound(self, x0: torch.Tensor) -> Bound:
        """The bound's named terms per example (:class:`~pyrovae.infer.bound.Bound`):
        ``recon``, ``kl_top``, ``kl_layers``; differentiable (wrap in
        ``torch.no_grad()`` to evaluate)."""
        raise NotImplementedError(f"{type(self).__name__} must define bound()")

    def sample(self, n: int, steps: int | None = None) -> torch.Tensor:
        """``n`` ancestral samples, ``(n, D)``, on a grid of ``steps`` times (default: the model's own)."""
        raise NotImplementedError(f"{type(self).__name__} must define sample()")

    def sampler_view(self):
        """What the samplers and the probability-flow ODE see of this model
        (:mod:`pyrovae.diffusion.samplers`): its noise levels on its own time
        axis and its eps prediction, so that they never ask which model it is."""
        raise NotImplementedError(f"{type(self).__name__} must define sampler_view()")

    def model(self, x0: torch.Tensor) -> None:
        """The generative chain as a Pyro program (observed site: the data)."""
        raise NotImplementedError(f"{type(self).__name__} must define model()")

    def guide(self, x0: torch.Tensor) -> None:
        """The fixed encoder as a Pyro program, in the model's order."""
        raise NotImplementedError(f"{type(self).__name__} must define guide()")
