"""The diffusion model as a hierarchical VAE, written as a Pyro model/guide pair.

Decoder (the generative chain, :meth:`DiffusionChain.model`)::

    x_T ~ p(x_T) = N(0, I)
    x_{t-1} ~ p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)      t = T..2
    x_0 ~ p_theta(x_0 | x_1)                                                 observed

Encoder (fixed, no parameters), in the seed's two factorisations of the same
q(x_{1:T} | x_0)::

    guide_forward:    x_1 ~ q(x_1|x_0), x_t ~ q(x_t|x_{t-1})                       t = 2..T
    guide_posterior:  x_T ~ q(x_T|x_0), x_{t-1} ~ q(x_{t-1}|x_t,x_0)               t = T..2

so that SVI with stock ``Trace_ELBO`` maximises

    ELBO = E_q[ -KL(q(x_T|x_0) || p(x_T))
                - sum_{t=2..T} KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t))
                + log p_theta(x_0|x_1) ]  <=  log p_theta(x_0).

The t = 1 term is split off because q(x_0 | x_1, x_0) is a point mass
(beta_tilde_1 = 0): there is no KL at t = 1, only the decoder's log-likelihood
of the observed x_0 given x_1 ~ q(x_1|x_0). The chain is the hierarchical VAE
built from the shared parts with a fixed encoder: p(x_T) is the
:class:`~pyrovae.parts.priors.StandardNormalPrior` module and p_theta(x_0|x_1)
a likelihood from :data:`~pyrovae.parts.likelihoods.LIKELIHOODS` whose scale
is the chain's sigma_1. For images the decoder is
:class:`~pyrovae.parts.likelihoods.Discretised` on the 256 pixel bins of
[-1, 1] (the chain's data range), a probability mass function, so the ELBO
bounds the discrete data's log-probability and converts to bits/dim
(:func:`pyrovae.infer.bound.bits_per_dim`); for continuous data (2-D toys) it
is a Gaussian density and the bound is in nats.

Shapes: data ``x0`` are flat, ``(B, D)``; latents x_t have the same shape; the
batch lives in ``pyro.plate("data", B)`` and every site has event shape ``(D,)``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyrovae import params
from pyrovae.checks import check_finite
from pyrovae.diffusion.schedule import NoiseSchedule
from pyrovae.infer.bound import bits_per_dim
from pyrovae.nets import first_parameter
from pyrovae.parts.likelihoods import LIKELIHOODS, MODEL_SCALE
from pyrovae.parts.priors import StandardNormal, StandardNormalPrior

PARAMETERIZATIONS = ("eps", "x0", "mean")
VARIANCES = ("beta_tilde", "beta", "learned")
DECODERS = ("discretised", "discretised-gaussian", "discretised-logistic", "gaussian")
DATA_RANGE = (-1.0, 1.0)
"""The chain's images: 8-bit pixels scaled to [-1, 1], as DDPM does."""


def normal_kl(
    mean_diff: torch.Tensor, log_var_q: torch.Tensor, log_var_p: torch.Tensor, event_size: int
) -> torch.Tensor:
    """KL(N(m_q, diag exp(log_var_q)) || N(m_p, diag exp(log_var_p))), summed over the event:

        0.5 sum_d [log_var_p - log_var_q + exp(log_var_q - log_var_p) - 1 + (m_q - m_p)^2 exp(-log_var_p)]

    ``mean_diff`` = m_q - m_p of shape ``batch_shape + (D,)``; each log-variance
    ``batch_shape + (D,)``, or ``batch_shape + (1,)`` for one variance shared by
    the ``event_size`` = D elements (computed once, not D times). Returns ``batch_shape``.
    """
    var_part = 0.5 * (-1.0 + log_var_p - log_var_q + torch.exp(log_var_q - log_var_p))
    var_sum = var_part.sum(-1) * (event_size / var_part.shape[-1])
    sq, inv_var = mean_diff.square(), torch.exp(-log_var_p)
    mean_sum = sq.sum(-1) * inv_var.squeeze(-1) if inv_var.shape[-1] == 1 else (sq * inv_var).sum(-1)
    return var_sum + 0.5 * mean_sum


class DiffusionChain(nn.Module):
    """p_theta(x_{0:T}) and the fixed encoder q(x_{1:T}|x_0) as Pyro programs.

    :param net: denoiser ``(x (N, D), t (N,) float) -> (N, k D)`` (see
        :mod:`pyrovae.diffusion.denoisers`), ``k = 2`` when ``variance="learned"``.
    :param schedule: the :class:`NoiseSchedule` (beta_1..beta_T).
    :param x_dim: D, the size of one flattened example.
    :param decoder: the likelihood p_theta(x_0|x_1), a name in
        :data:`~pyrovae.parts.likelihoods.LIKELIHOODS` that takes a scale:
        ``"discretised"`` (= ``"discretised-gaussian"``, images scaled to
        [-1, 1], 256 bins; DDPM's), ``"discretised-logistic"`` or ``"gaussian"``
        (continuous data). Its scale is sigma_1.
    :param parameterization: what the network predicts: ``"eps"`` (default; the
        noise, mu = (x_t - beta_t / sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_t)),
        ``"x0"`` (mu = mu_tilde_t(x_t, x0_hat)) or ``"mean"`` (mu directly).
    :param variance: sigma_t^2 = ``"beta_tilde"`` (beta_tilde_t, log clipped at
        t = 1), ``"beta"`` (beta_t), or ``"learned"``: log sigma_t^2 =
        v log beta_t + (1 - v) log beta_tilde_t with v = (net output + 1) / 2
        (improved DDPM).
    """

    def __init__(
        self,
        net: nn.Module,
        schedule: NoiseSchedule,
        x_dim: int,
        decoder: str = "gaussian",
        parameterization: str = "eps",
        variance: str = "beta_tilde",
    ):
        super().__init__()
        for name, value, allowed in (
            ("decoder", decoder, DECODERS),
            ("parameterization", parameterization, PARAMETERIZATIONS),
            ("variance", variance, VARIANCES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if x_dim < 1:
            raise ValueError(f"x_dim must be >= 1, got {x_dim}")
        want = 2 if variance == "learned" else 1
        if getattr(net, "out_mult", want) != want:
            raise ValueError(f"variance={variance!r} needs a net with out_mult={want}, got out_mult={net.out_mult}")
        self.net, self.schedule, self.x_dim = net, schedule, x_dim
        self.decoder, self.parameterization, self.variance = decoder, parameterization, variance
        self.prior = StandardNormalPrior(x_dim)
        likelihood = LIKELIHOODS[decoder]
        self.likelihood = likelihood(
            x_dim, scale=MODEL_SCALE, **({"data_range": DATA_RANGE} if likelihood.discrete else {})
        )

    @property
    def discrete(self) -> bool:
        """Whether p_theta(x_0|x_1) is a probability mass function (images), so that
        the bound converts to bits/dim."""
        return self.likelihood.discrete

    @property
    def T(self) -> int:
        return self.schedule.T

    def upgrade_state_dict(self, state: dict) -> dict:
        """``state`` as this chain's ``state_dict`` lays it out, for a chain saved by
        an older pyrovae: the schedule's tables are recomputed from the saved
        ``schedule.betas`` and ``schedule.timesteps`` (the schedule owns every number
        derived from beta_t, and later versions added tables), and the prior's
        buffers, absent before the chain held a prior module, are this chain's
        own (N(0, I) has nothing to learn). A current state is returned as it is."""
        own = self.state_dict()
        if set(state) == set(own):
            return state
        upgraded = dict(state)
        if "schedule.betas" in state:
            timesteps = state.get("schedule.timesteps")
            spaced = timesteps is not None and not torch.equal(timesteps.cpu(), torch.arange(1, len(timesteps) + 1))
            schedule = NoiseSchedule(
                state["schedule.betas"], timesteps if spaced else None, self.schedule.original_T if spaced else None
            )
            upgraded.update({f"schedule.{k}": v for k, v in schedule.state_dict().items()})
        upgraded.update({k: v for k, v in own.items() if k.startswith("prior.") and k not in state})
        return upgraded

    def tables(self, dtype: torch.dtype) -> dict:
        """The schedule's tables in ``dtype`` on the schedule's device, cast once
        and cached, plus the products the hot paths use: ``log_betas``,
        ``kl_noise_coef`` = coef1_t sqrt(1/alpha_bar_t - 1) (mu_tilde_t(x_t, x_0) -
        mu_theta(x_t, t) per unit of eps_theta - eps, eps prediction), ``tau``,
        the time the network is told (see :meth:`model_output`), and the two
        numbers of L_T against N(0, I) (see :meth:`prior_kl`): ``alpha_bar_T``
        and ``prior_kl_offset`` = -alpha_bar_T - log(1 - alpha_bar_T), 0-dim.

        The schedule stores float64 and :meth:`NoiseSchedule.extract` casts the
        entries it reads on every call (a slice, a copy and a cast per table per
        step); here each table is cast once. The cache is rebuilt when the
        schedule's buffers change (``.to()``, ``load_state_dict``)."""
        s = self.schedule
        key = (
            dtype,
            s.betas.device,
            s.betas.data_ptr(),
            s.betas._version,
            s.timesteps.data_ptr(),
            s.timesteps._version,
        )
        cached = self.__dict__.get("_tables_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            found = {name: buf.to(dtype) for name, buf in s.named_buffers() if buf.is_floating_point()}
            found["log_betas"] = s.betas.log().to(dtype)
            found["kl_noise_coef"] = (s.posterior_mean_coef1 * s.sqrt_recipm1_alphas_cumprod).to(dtype)
            found["tau"] = s.timesteps.to(dtype) * (1000.0 / s.original_T)
            a = s.alphas_cumprod[-1]
            found["alpha_bar_T"] = a.to(dtype)
            found["prior_kl_offset"] = (-a - torch.log1p(-a)).to(dtype)
        self.__dict__["_tables_cache"] = (key, found)
        return found

    def _time_index(self, t: torch.Tensor) -> torch.Tensor:
        """``t - 1`` for indexing the tables, with :meth:`NoiseSchedule.extract`'s
        checks (the range only under ``pyro.enable_validation``: it reads t back)."""
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"t must be an integer tensor of times in 1..{self.T}, got dtype {t.dtype}")
        if is_validation_enabled() and t.numel() and (t.min() < 1 or t.max() > self.T):
            raise ValueError(f"t must lie in 1..{self.T}, got values from {int(t.min())} to {int(t.max())}")
        return t - 1

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise
        (:meth:`NoiseSchedule.q_sample`) from the cached tables, in two passes."""
        tab, i = self.tables(x0.dtype), self._time_index(torch.as_tensor(t, device=x0.device))
        return torch.addcmul(
            tab["sqrt_alphas_cumprod"][i].unsqueeze(-1) * x0,
            tab["sqrt_one_minus_alphas_cumprod"][i].unsqueeze(-1),
            noise,
        )

    def check_data(self, x0: torch.Tensor) -> torch.Tensor:
        """Raise a clear error for data this chain cannot score; return ``x0``
        in the denoiser's floating dtype (float64 or half-precision data are cast)."""
        if not torch.is_tensor(x0) or not x0.is_floating_point():
            raise TypeError(f"x0 must be a float tensor, got {type(x0).__name__} {getattr(x0, 'dtype', '')}")
        if x0.dim() != 2 or x0.shape[1] != self.x_dim or x0.shape[0] == 0:
            raise ValueError(f"x0 must have shape (batch >= 1, {self.x_dim}), got {tuple(x0.shape)}")
        if x0.device != self.schedule.betas.device:
            raise ValueError(
                f"x0 is on {x0.device} but the chain is on {self.schedule.betas.device}; move one with .to()"
            )
        x0 = x0.to(first_parameter(self).dtype)
        if is_validation_enabled():
            check_finite(x0, "x0")
        if self.discrete and is_validation_enabled() and (x0.min() < -1 or x0.max() > 1):
            raise ValueError(
                f"x0 must be scaled to [-1, 1] for the discretised decoder, got values in [{x0.min():.3g}, {x0.max():.3g}]"
            )
        return x0

    # --- p_theta(x_{t-1} | x_t) -------------------------------------------------

    def model_output(self, x_t: torch.Tensor, t) -> tuple:
        """The denoiser at (x_t, t): ``(prediction, v)``, each ``x_t``'s shape;
        ``v`` is ``None`` unless the variance is learned. Any batch shape: leading
        dimensions are flattened into one network call. The network is told the
        original time tau_t (respaced chains) rescaled by the original chain's
        T to 0..1000, so a respaced chain asks the network what it was trained on."""
        batch_shape = x_t.shape[:-1]
        t = torch.as_tensor(t, device=x_t.device).expand(batch_shape)
        tau = self.tables(x_t.dtype)["tau"][t - 1]
        out = self.net(x_t.reshape(-1, self.x_dim), tau.reshape(-1)).reshape(*batch_shape, -1)
        if self.variance == "learned":
            pred, v = out.chunk(2, dim=-1)
            return pred, v
        return out, None

    def _x0_hat_log_variance(self, x_t: torch.Tensor, t, output: tuple | None, clip_x0: bool):
        """The raw prediction, the implied x0_hat and log sigma_t^2 (shape ``(..., 1)``
        for a fixed variance, ``x_t``'s shape for a learned one)."""
        s = self.schedule
        pred, v = self.model_output(x_t, t) if output is None else output
        min_log = s.extract(s.posterior_log_variance_clipped, t, x_t)
        max_log = s.extract(s.betas, t, x_t).log()
        if self.variance == "learned":
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            log_var = max_log if self.variance == "beta" else min_log
        if self.parameterization == "mean":
            x0_hat = (pred - s.extract(s.posterior_mean_coef2, t, x_t) * x_t) / s.extract(
                s.posterior_mean_coef1, t, x_t
            )
        elif self.parameterization == "eps":
            x0_hat = (
                s.extract(s.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - s.extract(s.sqrt_recipm1_alphas_cumprod, t, x_t) * pred
            )
        else:
            x0_hat = pred
        if clip_x0 and self.parameterization != "mean":
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        return pred, x0_hat, log_var

    def p_mean_variance(self, x_t: torch.Tensor, t, output: tuple | None = None, clip_x0: bool = False) -> dict:
        """mu_theta(x_t, t), log sigma_t^2 and the implied x0_hat, each ``x_t``'s shape.

        With eps or x0 prediction, mu_theta(x_t, t) = mu_tilde_t(x_t, x0_hat), the
        posterior mean at the predicted x_0.

        :param output: a precomputed :meth:`model_output` (e.g. with the
            prediction detached, for the hybrid objective).
        :param clip_x0: clamp x0_hat to [-1, 1] before forming the mean (for
            sampling images; not for an ELBO, which must score one fixed model).
        """
        pred, x0_hat, log_var = self._x0_hat_log_variance(x_t, t, output, clip_x0)
        mean = pred if self.parameterization == "mean" else self.schedule.q_posterior_mean_variance(x_t, x0_hat, t)[0]
        return {"mean": mean, "log_variance": log_var.expand_as(mean), "x0_hat": x0_hat}

    def p_step(self, x_t: torch.Tensor, t: int, clip_x0: bool = False) -> dist.Distribution:
        """p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I), for t >= 2."""
        out = self.p_mean_variance(x_t, t, clip_x0=clip_x0)
        return dist.Normal(out["mean"], (0.5 * out["log_variance"]).exp()).to_event(1)

    def p_decoder(self, x_1: torch.Tensor, clip_x0: bool = False) -> dist.Distribution:
        """p_theta(x_0 | x_1): the likelihood at the t = 1 step's mean with scale
        sigma_1 (for images, discretised to the 256 bins of [-1, 1])."""
        out = self.p_mean_variance(x_1, 1, clip_x0=clip_x0)
        return self.likelihood(out["mean"], (0.5 * out["log_variance"]).exp())

    # --- the literal chain as Pyro programs --------------------------------------

    def model(self, x0: torch.Tensor) -> None:
        """p(x_T) prod_{t=T..2} p_theta(x_{t-1}|x_t) p_theta(x_0|x_1): sample sites
        ``"x_T"``, ..., ``"x_1"``, observed site ``"x_0"``. One site per step, so
        tracing it costs O(T)."""
        params.module(self, "diffusion")  # a name of its own in the param store
        x0 = self.check_data(x0)
        with pyro.plate("data", x0.shape[0]):
            x = pyro.sample(f"x_{self.T}", self.prior())
            for t in range(self.T, 1, -1):
                x = pyro.sample(f"x_{t - 1}", self.p_step(x, t))
            pyro.sample("x_0", self.p_decoder(x), obs=x0)

    def guide_forward(self, x0: torch.Tensor) -> None:
        """q(x_{1:T}|x_0) = prod_{t=1..T} q(x_t|x_{t-1}): the forward process."""
        x0 = self.check_data(x0)
        with pyro.plate("data", x0.shape[0]):
            x = x0
            for t in range(1, self.T + 1):
                x = pyro.sample(f"x_{t}", self.schedule.q_step(x, t))

    def guide_posterior(self, x0: torch.Tensor) -> None:
        """q(x_{1:T}|x_0) = q(x_T|x_0) prod_{t=T..2} q(x_{t-1}|x_t,x_0): the same
        joint as :meth:`guide_forward` (Bayes' rule on each forward step),
        factorised in the model's order.

        With this guide ``TraceMeanField_ELBO`` computes exactly the seed's KL form:
        each site's KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t)) is taken in
        closed form given x_t, which is valid because x_t, the only latent the
        model conditions x_{t-1} on, is drawn *before* x_{t-1} in this guide. In
        :meth:`guide_forward` x_t is drawn after x_{t-1} and depends on it, so the
        per-site KL would condition on a descendant and the estimate would be
        biased (Pyro warns that the site orders differ).
        """
        x0 = self.check_data(x0)
        s = self.schedule
        with pyro.plate("data", x0.shape[0]):
            x = pyro.sample(f"x_{self.T}", s.q_xt_given_x0(x0, self.T))
            for t in range(self.T, 1, -1):
                x = pyro.sample(f"x_{t - 1}", s.q_posterior(x, x0, t))

    def guide(self, x0: torch.Tensor) -> None:
        """The default encoder, :meth:`guide_posterior` (the one whose per-site
        KLs are the seed's KL form)."""
        self.guide_posterior(x0)

    # --- the bound's terms in closed form ------------------------------------------

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T|x_0) || p(x_T)) in closed form, with p(x_T) the prior
        module (N(0, I)), shape ``x0.shape[:-1]`` (no parameters). Against the
        standard normal, with a = alpha_bar_T,

            L_T = (a |x_0|^2 - D (a + log(1 - a))) / 2,

        one pass over x_0 (the per-pixel variance 1 - a is one number)."""
        p = self.prior()
        if isinstance(p.base_dist, StandardNormal):
            tab = self.tables(x0.dtype)
            return 0.5 * (tab["alpha_bar_T"] * torch.linalg.vecdot(x0, x0) + self.x_dim * tab["prior_kl_offset"])
        mean, var = self.schedule.q_mean_variance(x0, self.T)
        return normal_kl(mean - p.base_dist.loc, var.log(), 2 * p.base_dist.scale.log(), self.x_dim)

    def decoder_nll(self, x0: torch.Tensor, mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
        """L_0 = -log p_theta(x_0|x_1) given the t = 1 step's mean and log sigma_1^2
        (each ``x0``'s shape), shape ``x0.shape[:-1]``."""
        return -self.likelihood(mean, (0.5 * log_variance).exp()).log_prob(x0)

    def vb_terms(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        output: tuple | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The bound's term at time t given x_t ~ q(x_t|x_0), summed over D:

            L_{t-1} = KL(q(x_{t-1}|x_t,x_0) || p_theta(x_{t-1}|x_t))   for t >= 2
            L_0     = -log p_theta(x_0|x_1)                             for t = 1

        ``x0`` broadcastable to ``x_t`` of shape ``batch_shape + (D,)``, ``t``
        integer of ``batch_shape`` (times may differ per entry); returns
        ``batch_shape``. Both Gaussians are diagonal and their means are the
        posterior mean at x_0 and at x0_hat, so mu_tilde - mu_theta =
        coef1_t (x_0 - x0_hat) and, for a fixed variance, the KL costs a few
        operations per element beyond the network.

        :param noise: the eps that drew x_t = sqrt(alpha_bar_t) x_0 +
            sqrt(1 - alpha_bar_t) eps, if known. With eps prediction the KL is
            then formed from it: x_0 - x0_hat = sqrt(1/alpha_bar_t - 1)
            (eps_theta - eps) exactly, so the mean part is
            (coef1_t^2 (1/alpha_bar_t - 1) / (2 sigma_t^2)) |eps_theta - eps|^2,
            two passes over the values instead of six (x0_hat is formed only
            where t = 1, for the decoder). The same number up to rounding.
        """
        x0 = x0.expand_as(x_t)
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[:-1])
        if noise is None or self.parameterization != "eps":
            return self._vb_terms(x0, x_t, t, output)
        tab, i = self.tables(x_t.dtype), self._time_index(t)
        pred, v = self.model_output(x_t, t) if output is None else output
        min_log = tab["posterior_log_variance_clipped"][i].unsqueeze(-1)
        if self.variance == "learned":
            frac = (v + 1) / 2
            log_var = frac * tab["log_betas"][i].unsqueeze(-1) + (1 - frac) * min_log
        else:
            log_var = tab["log_betas"][i].unsqueeze(-1) if self.variance == "beta" else min_log
        diff = pred - noise
        coef = tab["kl_noise_coef"][i]
        if log_var is min_log:
            # sigma_t^2 = beta_tilde_t: the variances agree, KL = coef^2 |diff|^2 / (2 beta_tilde_t)
            kl = (0.5 * coef.square() * torch.exp(-min_log.squeeze(-1))) * torch.linalg.vecdot(diff, diff)
        elif log_var.shape[-1] == 1:
            # KL = D/2 (log sigma^2 - log beta_tilde + beta_tilde/sigma^2 - 1) + coef^2 |diff|^2 / (2 sigma^2)
            var_part = 0.5 * (-1.0 + log_var - min_log + torch.exp(min_log - log_var)).squeeze(-1)
            kl = self.x_dim * var_part + (0.5 * coef.square() * torch.exp(-log_var.squeeze(-1))) * torch.linalg.vecdot(
                diff, diff
            )
        else:
            kl = normal_kl(coef.unsqueeze(-1) * diff, min_log, log_var, self.x_dim)
        is_decoder = t == 1
        if not is_decoder.any():  # most batches: no decoder term, skip its CDFs
            return kl
        # at t = 1 the term is the decoder's -log p(x_0|x_1), on those entries only
        x_1, i_1, pred_1 = x_t[is_decoder], i[is_decoder], pred[is_decoder]
        x0_hat = (
            tab["sqrt_recip_alphas_cumprod"][i_1].unsqueeze(-1) * x_1
            - tab["sqrt_recipm1_alphas_cumprod"][i_1].unsqueeze(-1) * pred_1
        )
        mean = (
            tab["posterior_mean_coef1"][i_1].unsqueeze(-1) * x0_hat
            + tab["posterior_mean_coef2"][i_1].unsqueeze(-1) * x_1
        )
        return kl.index_put((is_decoder,), self.decoder_nll(x0[is_decoder], mean, log_var.expand_as(x_t)[is_decoder]))

    def _vb_terms(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, output: tuple | None) -> torch.Tensor:
        """:meth:`vb_terms` through x0_hat (any parameterisation; x_t need not come from a known noise)."""
        s = self.schedule
        pred, x0_hat, log_var = self._x0_hat_log_variance(x_t, t, output, clip_x0=False)
        mean_diff = s.extract(s.posterior_mean_coef1, t, x_t) * (x0 - x0_hat)
        kl = normal_kl(mean_diff, s.extract(s.posterior_log_variance_clipped, t, x_t), log_var, self.x_dim)
        is_decoder = t == 1
        if not is_decoder.any():  # most batches: no decoder term, skip its CDFs
            return kl
        # at t = 1 the term is the decoder's -log p(x_0|x_1), on those entries only
        x_1, t_1 = x_t[is_decoder], t[is_decoder]
        mean = (
            pred[is_decoder]
            if self.parameterization == "mean"
            else s.q_posterior_mean_variance(x_1, x0_hat[is_decoder], t_1)[0]
        )
        return kl.index_put((is_decoder,), self.decoder_nll(x0[is_decoder], mean, log_var.expand_as(x_t)[is_decoder]))

    def full_bound(self, x0: torch.Tensor, chunk_size: int = 512) -> dict:
        """-ELBO(x0) with every term, x_t ~ q(x_t|x_0) drawn independently for each
        t, evaluated as batched network calls over (t, example) pairs, at most
        ``chunk_size`` pairs per call (bounds memory).

        Returns a dict of tensors: ``prior`` (B,) = L_T, ``terms`` (B, T) with
        ``terms[:, t-1]`` = L_{t-1} (column 0 is the decoder's -log p(x_0|x_1)),
        ``total`` (B,) = -ELBO in nats, ``bits_per_dim`` (B,) = total / (D ln 2)
        (:func:`~pyrovae.infer.bound.bits_per_dim`). In the bound's vocabulary
        (:mod:`pyrovae.infer.bound`): ``kl_top`` = prior, ``recon`` = -terms[:, 0],
        ``kl_layers`` = terms[:, 1:].sum(-1).
        Differentiable; wrap in ``torch.no_grad()`` to evaluate.
        """
        x0 = self.check_data(x0)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        B = x0.shape[0]
        per_call = max(1, chunk_size // B)
        chunks = []
        for start in range(1, self.T + 1, per_call):
            ts = torch.arange(start, min(start + per_call, self.T + 1), device=x0.device)
            t = ts[:, None].expand(len(ts), B)
            x0_t = x0.expand(len(ts), B, self.x_dim)
            noise = torch.randn_like(x0_t)
            chunks.append(self.vb_terms(x0_t, self.q_sample(x0_t, t, noise), t, noise=noise))
        terms = torch.cat(chunks, 0).T
        prior = self.prior_kl(x0)
        total = prior + terms.sum(-1)
        return {"prior": prior, "terms": terms, "total": total, "bits_per_dim": bits_per_dim(total, self.x_dim)}

    # --- sampling -------------------------------------------------------------------

    def respaced(self, steps: int) -> DiffusionChain:
        """The chain on ``steps`` evenly spaced times of this one (improved DDPM's
        respacing), sharing this chain's network: a valid shorter chain whose
        own ELBO and samples can be computed as for any chain."""
        if self.parameterization == "mean":
            raise ValueError("respacing needs parameterization 'eps' or 'x0': a predicted mean belongs to its own step")
        return DiffusionChain(
            self.net, self.schedule.respace(steps), self.x_dim, self.decoder, self.parameterization, self.variance
        )

    @torch.no_grad()
    def sample(self, n: int, steps: int | None = None, clip_x0: bool | None = None) -> torch.Tensor:
        """Ancestral sampling, x_T ~ N(0, I), x_{t-1} ~ p_theta(x_{t-1}|x_t) for
        t = T..2, returning the decoder's mean given x_1, shape ``(n, D)``.

        :param steps: use the chain respaced to this many steps (default: all T).
        :param clip_x0: clamp x0_hat to [-1, 1] at each step (default: for images).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        chain = self if steps is None or steps == self.T else self.respaced(steps)
        clip_x0 = self.discrete if clip_x0 is None else clip_x0
        ref = self.schedule.betas
        dtype = next(self.net.parameters()).dtype
        x = torch.randn(n, self.x_dim, device=ref.device, dtype=dtype)
        # Every step's numbers read once, as Python numbers in the network's dtype
        # (what p_mean_variance computes per step from the float64 tables: a
        # slice, a cast and a copy per table), so the loop is the network call
        # and a few passes over x.
        tab = {name: values.tolist() for name, values in chain.tables(dtype).items()}
        learned, parameterization = chain.variance == "learned", chain.parameterization
        for i in range(chain.T - 1, 0, -1):  # t = i + 1 = T..2
            out = self.net(x, torch.full((n,), tab["tau"][i], device=ref.device, dtype=dtype))
            pred, v = out.chunk(2, dim=-1) if learned else (out, None)
            c1, c2 = tab["posterior_mean_coef1"][i], tab["posterior_mean_coef2"][i]
            if parameterization == "mean":
                mean = pred
            else:
                x0_hat = (
                    tab["sqrt_recip_alphas_cumprod"][i] * x - tab["sqrt_recipm1_alphas_cumprod"][i] * pred
                    if parameterization == "eps"
                    else pred
                )
                if clip_x0:
                    x0_hat = x0_hat.clamp(-1.0, 1.0)
                mean = c1 * x0_hat + c2 * x
            if learned:
                frac = (v + 1) / 2
                sigma = (
                    0.5 * (frac * tab["log_betas"][i] + (1 - frac) * tab["posterior_log_variance_clipped"][i])
                ).exp()
            else:
                sigma = math.exp(
                    0.5 * tab["log_betas" if chain.variance == "beta" else "posterior_log_variance_clipped"][i]
                )
            # a draw from p_step(x, t): mean + sigma_t z, without building the Normal
            x = (
                torch.addcmul(mean, torch.randn_like(mean), sigma)
                if learned
                else mean.add(torch.randn_like(mean), alpha=sigma)
            )
        return chain.p_decoder(x, clip_x0=clip_x0).mean
