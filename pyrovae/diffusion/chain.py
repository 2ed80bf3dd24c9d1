"""The diffusion model as a hierarchical VAE, written as a Pyro model/guide pair.

Decoder (the generative chain, :meth:`DiffusionChain.model`)::

    x_T ~ p(x_T) = N(0, I)
    x_{t-1} ~ p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I)      t = T..2
    x_0 ~ p_theta(x_0 | x_1)                                                 observed

Encoder (fixed, no parameters), in the seed's two factorisations of the same
q(x_{1:T} | x_0)::

    guide_forward:    x_1 ~ q(x_1|x_0), x_t ~ q(x_t|x_{t-1})                       t = 2..T
    guide_posterior:  x_T ~ q(x_T|x_0), x_{t-1} ~ q(x_{t-1}|x_t,x_0)               t = T..2

so that SVI with stock ``Trace_ELBO`` maximises ::

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

import functools
import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae import params
from pyrovae.diffusion.base import DATA_RANGE, DiffusionModel
from pyrovae.diffusion.schedule import NoiseSchedule
from pyrovae.infer.bound import Bound, bits_per_dim
from pyrovae.nets import first_parameter
from pyrovae.parts.kl import normal_kl
from pyrovae.parts.likelihoods import LIKELIHOODS, MODEL_SCALE
from pyrovae.parts.priors import StandardNormal, StandardNormalPrior
from pyrovae.registry import lookup

PARAMETERIZATIONS = ("eps", "x0", "mean")
VARIANCES = ("beta_tilde", "beta", "learned")
SAMPLER_TABLES = (
    "tau",
    "log_betas",
    "posterior_log_variance_clipped",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
"""The tables a step of the sampler reads (:class:`PTheta`'s numbers and the network's time)."""
DECODERS = ("discretised", "discretised-gaussian", "discretised-logistic", "gaussian")


class _StepNumbers:
    """The schedule's numbers at the times ``i`` (table indices, an int or a
    tensor of the batch shape), read from the chain's tables
    (:meth:`DiffusionChain.tables`) when first asked for, as ``(..., 1)``
    tensors that broadcast against x_t: a caller gathers only the tables it uses."""

    def __init__(self, tables: dict, i):
        self.tables, self.i, self.read = tables, i, {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.read:
            self.read[name] = self.tables[name][self.i].unsqueeze(-1)
        return self.read[name]


class PTheta:
    """p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I) from the network's
    output at (x_t, t): the one place its mean and variance are formed (the
    loss and the bound through :meth:`DiffusionChain.vb_terms`, ``p_step``,
    ``p_decoder`` and the sampler all read them here)::

        log sigma_t^2 = log beta_tilde_t (clipped at t = 1) | log beta_t | v log beta_t + (1 - v) log beta_tilde_t
        x0_hat        = sqrt(1/alpha_bar_t) x_t - sqrt(1/alpha_bar_t - 1) eps_theta  (eps prediction)
                      | the prediction (x0) | (mu_theta - coef2_t x_t) / coef1_t   (mean)
        mu_theta      = coef1_t x0_hat + coef2_t x_t = mu_tilde_t(x_t, x0_hat)      (eps, x0) | the prediction (mean)

    with v = (net output + 1) / 2 for a learned variance (improved DDPM). Each
    is computed when first read, so a caller pays for what it uses (the loss's
    fast path reads the log-variance only). ``x_t``, ``pred`` and ``v`` are of
    shape ``batch_shape + (D,)``; ``numbers`` the step's schedule numbers by
    table name (:class:`_StepNumbers`, or the sampler's dict of Python numbers);
    ``clip_x0`` clamps x0_hat to [-1, 1] (sampling images, never a bound).
    """

    def __init__(self, chain, x_t: torch.Tensor, pred: torch.Tensor, v, numbers, clip_x0: bool = False):
        self.parameterization, self.variance = chain.parameterization, chain.variance
        self.x_t, self.pred, self.v, self.numbers, self.clip_x0 = x_t, pred, v, numbers, clip_x0

    @functools.cached_property
    def log_variance(self):
        """log sigma_t^2: ``x_t``'s shape when learned, else ``(..., 1)`` (or a number)."""
        c = self.numbers
        if self.variance == "learned":
            frac = (self.v + 1) / 2
            return frac * c["log_betas"] + (1 - frac) * c["posterior_log_variance_clipped"]
        return c["log_betas" if self.variance == "beta" else "posterior_log_variance_clipped"]

    @functools.cached_property
    def x0_hat(self) -> torch.Tensor:
        c, x_t, pred = self.numbers, self.x_t, self.pred
        if self.parameterization == "mean":
            return (pred - c["posterior_mean_coef2"] * x_t) / c["posterior_mean_coef1"]
        if self.parameterization == "eps":
            x0_hat = c["sqrt_recip_alphas_cumprod"] * x_t - c["sqrt_recipm1_alphas_cumprod"] * pred
        else:
            x0_hat = pred
        return x0_hat.clamp(-1.0, 1.0) if self.clip_x0 else x0_hat

    @functools.cached_property
    def mean(self) -> torch.Tensor:
        if self.parameterization == "mean":
            return self.pred
        return self.numbers["posterior_mean_coef1"] * self.x0_hat + self.numbers["posterior_mean_coef2"] * self.x_t


class DiffusionChain(DiffusionModel):
    """p_theta(x_{0:T}) and the fixed encoder q(x_{1:T}|x_0) as Pyro programs, a
    :class:`~pyrovae.diffusion.base.DiffusionModel` whose times are the integer
    steps t = 1..T.

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
            lookup(name, value, allowed)
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

    data_name = "x0"

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
        if set(state) == set(self.state_dict()):
            return state
        upgraded = dict(state)
        if "schedule.betas" in state:
            timesteps = state.get("schedule.timesteps")
            spaced = timesteps is not None and not torch.equal(timesteps.cpu(), torch.arange(1, len(timesteps) + 1))
            schedule = NoiseSchedule(
                state["schedule.betas"], timesteps if spaced else None, self.schedule.original_T if spaced else None
            )
            upgraded.update({f"schedule.{k}": v for k, v in schedule.state_dict().items()})
        return super().upgrade_state_dict(upgraded)

    def reference(self) -> torch.Tensor:
        """The denoiser's first parameter (the schedule's betas for a denoiser without any)."""
        p = first_parameter(self)
        return self.schedule.betas if p is None else p

    def tables(self, dtype: torch.dtype) -> dict:
        """The schedule's tables in ``dtype`` on the schedule's device, cast once
        and cached, plus the products the hot paths use: ``log_betas``,
        ``kl_noise_coef`` = coef1_t sqrt(1/alpha_bar_t - 1) (mu_tilde_t(x_t, x_0) -
        mu_theta(x_t, t) per unit of eps_theta - eps, eps prediction), ``tau``,
        the time the network is told (see :meth:`model_output`), and, as Python
        numbers, q(x_T|x_0)'s ``sqrt_alpha_bar_T`` and ``log_one_minus_alpha_bar_T``
        (see :meth:`prior_kl`: a constant, read without a device round trip).

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
            found["sqrt_alpha_bar_T"], found["log_one_minus_alpha_bar_T"] = a.sqrt().item(), torch.log1p(-a).item()
        self.__dict__["_tables_cache"] = (key, found)
        return found

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise
        (:meth:`NoiseSchedule.q_sample`) from the cached tables, in two passes."""
        tab, i = self.tables(x0.dtype), self.schedule.time_index(torch.as_tensor(t, device=x0.device))
        return torch.addcmul(
            tab["sqrt_alphas_cumprod"][i].unsqueeze(-1) * x0,
            tab["sqrt_one_minus_alphas_cumprod"][i].unsqueeze(-1),
            noise,
        )

    def alpha_sigma(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) at integer times ``t`` in
        1..T, in the model's dtype."""
        tab, i = self.tables(self.reference().dtype), self.schedule.time_index(t)
        return tab["sqrt_alphas_cumprod"][i], tab["sqrt_one_minus_alphas_cumprod"][i]

    def log_snr(self, t) -> torch.Tensor:
        """log(alpha_bar_t / (1 - alpha_bar_t)) at integer times ``t`` in 1..T."""
        tab, i = self.tables(self.reference().dtype), self.schedule.time_index(t)
        return tab["alphas_cumprod"][i].log() - tab["one_minus_alphas_cumprod"][i].log()

    def predict_eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """eps_hat(x_t, t): the network's output with eps prediction, else the noise
        implied by x0_hat, (sqrt(1/alpha_bar_t) x_t - x0_hat) / sqrt(1/alpha_bar_t - 1)."""
        p = self.p_theta(x_t, t)
        if self.parameterization == "eps":
            return p.pred
        c = p.numbers
        return (c["sqrt_recip_alphas_cumprod"] * x_t - p.x0_hat) / c["sqrt_recipm1_alphas_cumprod"]

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

    def p_theta(self, x_t: torch.Tensor, t, output: tuple | None = None, clip_x0: bool = False) -> PTheta:
        """p_theta(x_{t-1} | x_t)'s mean, log-variance and x0_hat (:class:`PTheta`),
        each computed when first read, for ``t`` an int or an integer tensor of
        ``x_t.shape[:-1]``.

        :param output: a precomputed :meth:`model_output` (e.g. with the
            prediction detached, for the hybrid objective).
        :param clip_x0: clamp x0_hat to [-1, 1] before forming the mean (for
            sampling images; not for an ELBO, which must score one fixed model).
        """
        numbers = _StepNumbers(self.tables(x_t.dtype), self.schedule.time_index(t))
        return PTheta(self, x_t, *(self.model_output(x_t, t) if output is None else output), numbers, clip_x0)

    def p_mean_variance(self, x_t: torch.Tensor, t, output: tuple | None = None, clip_x0: bool = False) -> dict:
        """mu_theta(x_t, t), log sigma_t^2 and the implied x0_hat (:meth:`p_theta`),
        each ``x_t``'s shape. With eps or x0 prediction, mu_theta(x_t, t) =
        mu_tilde_t(x_t, x0_hat), the posterior mean at the predicted x_0."""
        p = self.p_theta(x_t, t, output, clip_x0)
        return {"mean": p.mean, "log_variance": p.log_variance.expand_as(p.mean), "x0_hat": p.x0_hat}

    def p_step(self, x_t: torch.Tensor, t: int, clip_x0: bool = False) -> dist.Distribution:
        """p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I), for t >= 2."""
        p = self.p_theta(x_t, t, clip_x0=clip_x0)
        return dist.Normal(p.mean, (0.5 * p.log_variance).exp().expand_as(p.mean)).to_event(1)

    def p_decoder(self, x_1: torch.Tensor, clip_x0: bool = False) -> dist.Distribution:
        """p_theta(x_0 | x_1): the likelihood at the t = 1 step's mean with scale
        sigma_1 (for images, discretised to the 256 bins of [-1, 1])."""
        p = self.p_theta(x_1, 1, clip_x0=clip_x0)
        return self.likelihood(p.mean, (0.5 * p.log_variance).exp().expand_as(p.mean))

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
        module (N(0, I)), shape ``x0.shape[:-1]`` (no parameters): :func:`normal_kl`
        of q(x_T|x_0) = N(sqrt(alpha_bar_T) x_0, (1 - alpha_bar_T) I), whose
        variance is one number, against the N(0, I) module in one pass over
        x_0 (the schedule's numbers as Python numbers)."""
        p = self.prior()
        if isinstance(p.base_dist, StandardNormal):
            tab = self.tables(x0.dtype)
            return normal_kl(x0, tab["log_one_minus_alpha_bar_T"], None, self.x_dim, mean_scale=tab["sqrt_alpha_bar_T"])
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
        """The bound's term at time t given x_t ~ q(x_t|x_0), summed over D::

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
            (coef1_t^2 (1/alpha_bar_t - 1) / (2 sigma_t^2)) ``|eps_theta - eps|^2``,
            two passes over the values instead of six (x0_hat is formed only
            where t = 1, for the decoder). The same number up to rounding.
        """
        x0 = x0.expand_as(x_t)
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[:-1])
        tab, i = self.tables(x_t.dtype), self.schedule.time_index(t)
        pred, v = self.model_output(x_t, t) if output is None else output
        p = PTheta(self, x_t, pred, v, _StepNumbers(tab, i))
        # the posterior's log-variance, the same tensor as p's for sigma_t^2 = beta_tilde_t (whose KL
        # then has no variance part): normal_kl skips it, and weighs |mean difference|^2 once per entry
        # where sigma_t^2 is one number per entry
        min_log = p.numbers["posterior_log_variance_clipped"]
        if noise is not None and self.parameterization == "eps":
            kl = normal_kl(pred - noise, min_log, p.log_variance, self.x_dim, mean_scale=tab["kl_noise_coef"][i])
        else:
            kl = normal_kl(
                x0 - p.x0_hat, min_log, p.log_variance, self.x_dim, mean_scale=tab["posterior_mean_coef1"][i]
            )
        is_decoder = t == 1
        if not is_decoder.any():  # most batches: no decoder term, skip its CDFs
            return kl
        # at t = 1 the term is the decoder's -log p(x_0|x_1), on those entries only
        x_1 = x_t[is_decoder]
        mean = PTheta(self, x_1, pred[is_decoder], None, _StepNumbers(tab, i[is_decoder])).mean
        log_var = p.log_variance.expand_as(x_t)[is_decoder]
        return kl.index_put((is_decoder,), self.decoder_nll(x0[is_decoder], mean, log_var))

    def bound(self, x0: torch.Tensor, chunk_size: int = 512, per_layer: bool = False) -> Bound:
        """The bound with every term (:class:`~pyrovae.infer.bound.Bound`, per
        example, nats): ``recon`` = -L_0 = log p_theta(x_0|x_1), ``kl_top`` = L_T,
        ``kl_layers`` = sum_{t=2..T} L_{t-1}, each L_{t-1} at one x_t ~ q(x_t|x_0)
        drawn independently for each t (:meth:`vb_terms`), evaluated as batched
        network calls over (t, example) pairs, at most ``chunk_size`` pairs per
        call (bounds memory). With ``per_layer``, ``layers`` holds L_{t-1} as
        ``"kl_{t-1}"`` for t = 2..T (layer l = t - 1 is the latent x_l).
        Differentiable; wrap in ``torch.no_grad()`` to evaluate."""
        x0, terms = self._terms(x0, chunk_size)
        layers = {f"kl_{t - 1}": terms[:, t - 1] for t in range(2, self.T + 1)} if per_layer else {}
        return Bound(
            recon=-terms[:, 0],
            kl_top=self.prior_kl(x0),
            kl_layers=terms[:, 1:].sum(-1),
            layers=layers,
            dim=self.x_dim if self.discrete else None,
        )

    def full_bound(self, x0: torch.Tensor, chunk_size: int = 512) -> dict:
        """Deprecated: :meth:`bound` returns the same terms as a ``Bound``. The
        terms of :meth:`bound` as the dict of tensors that came before it:
        ``prior`` (B,) = L_T, ``terms`` (B, T) with ``terms[:, t-1]`` = L_{t-1}
        (column 0 the decoder's -log p(x_0|x_1)), ``total`` (B,) = -ELBO in nats,
        ``bits_per_dim`` (B,) = total / (D ln 2)."""
        x0, terms = self._terms(x0, chunk_size)
        prior = self.prior_kl(x0)
        total = prior + terms.sum(-1)
        return {"prior": prior, "terms": terms, "total": total, "bits_per_dim": bits_per_dim(total, self.x_dim)}

    def _terms(self, x0: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``x0`` checked, and L_{t-1} for t = 1..T, shape ``(B, T)`` (see :meth:`bound`)."""
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
        return x0, torch.cat(chunks, 0).T

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
    def sampler_view(self):
        """The samplers' view of this model (:class:`~pyrovae.diffusion.samplers.ChainView`)."""
        from pyrovae.diffusion.samplers import ChainView  # the samplers import the models

        return ChainView(self)

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
        # Every step's numbers read once, as Python numbers in the network's dtype, one
        # dict per step (not a slice, a cast and a copy per table per step), so the loop
        # is the network call and a few passes over x.
        tab = chain.tables(dtype)
        per_step = [dict(zip(SAMPLER_TABLES, v)) for v in zip(*(tab[name].tolist() for name in SAMPLER_TABLES))]
        learned = chain.variance == "learned"
        for i in range(chain.T - 1, 0, -1):  # t = i + 1 = T..2
            numbers = per_step[i]
            out = self.net(x, torch.full((n,), numbers["tau"], device=ref.device, dtype=dtype))
            p = PTheta(chain, x, *(out.chunk(2, dim=-1) if learned else (out, None)), numbers, clip_x0)
            # a draw from p_step(x, t): mean + sigma_t z, without building the Normal
            if learned:
                x = torch.addcmul(p.mean, torch.randn_like(p.mean), (0.5 * p.log_variance).exp())
            else:
                x = p.mean.add(torch.randn_like(p.mean), alpha=math.exp(0.5 * p.log_variance))
        return chain.p_decoder(x, clip_x0=clip_x0).mean
