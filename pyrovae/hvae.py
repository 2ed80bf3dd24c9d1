"""The hierarchical VAE: L >= 1 stochastic layers as a Pyro model/guide pair.
The VAE is its one-layer case (:func:`~pyrovae.vae.build_vae` is
:func:`build_hvae` with one layer): one class for both.

Generative story (``model``), for each example x in the batch, z_1 the layer
next to the data and z_L the top::

    z_L     ~ p(z_L)                               prior module, event shape (z_dims[-1],)
    z_{l-1} ~ p_theta(z_{l-1} | z_l)               N(mu_theta(z_l), diag sigma_theta(z_l)^2), l = L..2
    x       ~ p_theta(x | z_1)                     likelihood(decoder(z_1)), event shape (x_dim,)

Two inference networks (``encoder=``), the counterparts of the diffusion chain's
two guides:

- ``"bottom-up"`` (Burda et al. 2016, the IWAE paper's L-layer VAE; the chain's
  ``guide_forward``): q(z_1 | x) q(z_2 | z_1) ... q(z_L | z_{L-1}). The model's
  parent z_{l+1} of z_l is drawn *after* z_l and from it, so the closed-form KL
  at z_1..z_{L-1} would be biased: :class:`~pyrovae.infer.TraceAnalyticKL_ELBO`
  uses Monte Carlo there (and warns once) and the closed form at z_L only.
- ``"top-down"`` (Ladder VAE, Sønderby et al. 2016; the chain's
  ``guide_posterior``): a deterministic bottom-up pass d_1 = f_1(x), d_l = f_l(d_{l-1})
  gives each layer's encoder estimate N(mu_hat_l, sigma_hat_l^2); then z_L ~
  N(mu_hat_L, sigma_hat_L^2) and, top-down, each q(z_{l-1} | z_l, x) is the
  precision-weighted combination of that estimate with the model's own
  p_theta(z_{l-1} | z_l) = N(mu_p, sigma_p^2)::

      sigma_q^-2 = sigma_hat^-2 + sigma_p^-2,   mu_q = sigma_q^2 (mu_hat sigma_hat^-2 + mu_p sigma_p^-2).

  The guide samples in the model's order, so every layer's KL is exact.

With L = 1 both encoders are q(z | x), any encoder of
:data:`~pyrovae.parts.encoders.GUIDES` over an MLP or conv net, and the model is
the VAE: its one latent site is named ``"z"`` (``"z_1"`` .. ``"z_L"`` for L > 1),
and its parameter names are the VAE's (``encoder.*``, ``decoder.*``,
``prior.*``, ``likelihood.*``), so checkpoints of either load unchanged.

The conditional VAE (CVAE, Sohn, Lee & Yan 2015) is the same class built with
``num_classes`` or ``y_shape`` (:func:`build_hvae`): a conditioning input y
(:class:`~pyrovae.nets.Conditioning`: one-hot classes, or a flattened float
tensor such as a masked image) is concatenated to the decoder's input,
p_theta(x | z_1, y), and to the encoder's, q_phi(z_1 | x, y) (and so to every
layer the top-down pass reads); p(z_L) stays N(0, I), as in M2. ``model(x, y)``
and ``guide(x, y)`` are then the pair whose ELBO bounds log p(x | y). Built
without either, the model is exactly the unconditional one (same parameters,
same numbers).

The bound's named terms (per example, nats; :meth:`HVAE.bound`): ``recon`` =
E_q log p(x | z_1); ``kl_l`` = E_q KL(q(z_l | .) || p(z_l | z_{l+1})) for l < L
and ``kl_L`` = KL(q(z_L | .) || p(z_L)) at the top, which is also reported as
``kl_top``; ``kl_layers`` = kl_1 + ... + kl_{L-1}, the layers *below* the top, so
that ``elbo = recon - kl_top - kl_layers`` for every model here (the VAE has
kl_layers = 0; the diffusion chain's kl_layers is its sum of per-t KLs below
L_T).
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.nn.functional import softplus

from pyrovae import params
from pyrovae.checks import check_batch, check_finite
from pyrovae.infer.analytic_elbo import TraceAnalyticKL_ELBO
from pyrovae.infer.bound import Bound
from pyrovae.nets import MLP, Conditioning, ConvDecoderNet, ConvEncoderNet, check_sizes, first_parameter
from pyrovae.parts.encoders import GUIDES, MIN_SCALE
from pyrovae.parts.likelihoods import LIKELIHOODS, BernoulliLikelihood
from pyrovae.parts.priors import PRIORS, StandardNormalPrior
from pyrovae.registry import lookup

ENCODERS = ("top-down", "bottom-up")


def check_event(d, part: str, z_dim: int):
    """``d`` if its event shape is ``(z_dim,)``, else a ``ValueError`` naming
    the part (before the decoder fails on a raw matrix-size error)."""
    if tuple(d.event_shape) != (z_dim,):
        raise ValueError(
            f"the {part} must return a distribution with event shape (z_dim,) = ({z_dim},), "
            f"got event shape {tuple(d.event_shape)}"
        )
    return d


def normal_params(out: torch.Tensor, z_dim: int) -> tuple:
    """(mu, sigma) from a network's ``2 * z_dim`` outputs, sigma = softplus(raw) + MIN_SCALE
    (as :class:`~pyrovae.parts.encoders.DiagonalNormalEncoder`)."""
    loc, raw_scale = out.split(z_dim, dim=-1)
    return loc, softplus(raw_scale) + MIN_SCALE


def precision_weighted(loc_hat, scale_hat, loc_p, scale_p) -> tuple:
    """The Ladder VAE's combination: the product of N(mu_hat, sigma_hat^2) and
    N(mu_p, sigma_p^2), renormalised (see the module docstring)."""
    prec_hat, prec_p = scale_hat.pow(-2), scale_p.pow(-2)
    var = 1 / (prec_hat + prec_p)
    return var * (loc_hat * prec_hat + loc_p * prec_p), var.sqrt()


class HVAE(nn.Module):
    """A hierarchical VAE composed of replaceable parts; with one layer, the VAE.

    :param encoder: module ``x (B, x_dim) -> q(z_1 | x)``, batch shape ``(B,)``
        and event shape ``(z_dims[0],)``. The top-down encoder with L > 1 reads
        the hidden layers of its ``net``: a
        :class:`~pyrovae.parts.encoders.DiagonalNormalEncoder` whose ``net`` is an
        :class:`~pyrovae.nets.MLP`.
    :param up: L - 1 MLPs, ``up[l-2]`` giving the ``2 * z_dims[l-1]`` parameters of
        layer l from z_{l-1} (bottom-up) or from the previous MLP's last hidden
        layer (top-down).
    :param steps: L - 1 networks, ``steps[l-2]``: z_l -> the ``2 * z_dims[l-2]``
        parameters of p_theta(z_{l-1} | z_l).
    :param decoder: module ``z_1 -> parameters`` of the likelihood.
    :param x_dim: size of one flattened example; :meth:`model` and :meth:`guide`
        check the data against it.
    :param z_dims: sizes of z_1 .. z_L.
    :param prior: module ``() -> p(z_L)``, event shape ``(z_dims[-1],)``; default N(0, I).
    :param likelihood: module, decoder output -> p_theta(x | z_1), event shape
        ``(x_dim,)``; default Bernoulli.
    :param encoder_order: ``"top-down"`` or ``"bottom-up"`` (module docstring;
        the same q(z | x) for L = 1).
    :param conditioning: a :class:`~pyrovae.nets.Conditioning` for the CVAE:
        ``encoder`` (and the top-down ``up`` MLPs' first) then reads x
        concatenated with y's ``conditioning.dim`` features and ``decoder`` z_1
        with them; ``None`` (default) for a model of p(x).

    The latent sites are :attr:`sites`: ``"z"`` for one layer, ``"z_1"`` ..
    ``"z_L"`` otherwise. Model and guide register the model with ``pyro.module``
    under a name of its own (:func:`pyrovae.params.module`), so every
    parameter, the prior's included, is in Pyro's param store and trained by
    SVI, and any number of models live in one session.
    """

    def __init__(
        self,
        encoder: nn.Module,
        up,
        steps,
        decoder: nn.Module,
        x_dim: int,
        z_dims,
        prior=None,
        likelihood=None,
        encoder_order: str = "bottom-up",
        conditioning: Conditioning | None = None,
    ):
        super().__init__()
        z_dims = tuple(z_dims)
        if not z_dims:
            raise ValueError("z_dims must name at least one layer, got ()")
        check_sizes(x_dim=x_dim, **{f"z_dims[{i}]": z for i, z in enumerate(z_dims)})
        lookup("encoder", encoder_order, ENCODERS)
        if len(up) != len(z_dims) - 1 or len(steps) != len(z_dims) - 1:
            raise ValueError(
                f"{len(z_dims)} layers need {len(z_dims) - 1} up and step networks, got {len(up)} and {len(steps)}"
            )
        self.x_dim, self.z_dims, self.encoder_order = x_dim, z_dims, encoder_order
        self.encoder, self.decoder = encoder, decoder
        self.up, self.steps = nn.ModuleList(up), nn.ModuleList(steps)
        self.prior = prior if prior is not None else StandardNormalPrior(z_dims[-1])
        self.likelihood = likelihood if likelihood is not None else BernoulliLikelihood()
        self.sites = ("z",) if len(z_dims) == 1 else tuple(f"z_{l}" for l in range(1, len(z_dims) + 1))
        self._store_kind = "vae" if len(z_dims) == 1 else "hvae"
        self.conditioning = conditioning

    @property
    def conditional(self) -> bool:
        return self.conditioning is not None

    def y_features(self, y, batch: int, like: torch.Tensor) -> torch.Tensor | None:
        """y's network input (:meth:`Conditioning.features <pyrovae.nets.Conditioning.features>`,
        shape ``(batch, n)``, ``like``'s dtype and device) for a conditional
        model; ``None`` for an unconditional one. A clear error for a y missing,
        unexpected or of the wrong kind."""
        if self.conditioning is None:
            if y is not None:
                raise ValueError("this model is unconditional (built without num_classes or y_shape), got y")
            return None
        if y is None:
            raise ValueError(
                "this model is conditional: give y "
                + (f"(classes in [0, {self.conditioning.num_classes}))" if self.conditioning.num_classes else "")
            )
        return self.conditioning.features(self.conditioning.check(y, batch), like.dtype).to(like.device)

    @staticmethod
    def append(h: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """``h`` (``(..., B, n)``) with the features ``c`` (``(B, m)``) appended
        along its last axis; ``h`` itself for ``c`` None (an unconditional model)."""
        return h if c is None else torch.cat([h, c.expand(*h.shape[:-1], c.shape[-1])], -1)

    def with_y(self, h: torch.Tensor, y) -> torch.Tensor:
        """``h`` (``(..., B, n)``) with y's features appended along its last axis
        for a conditional model; ``h`` itself for an unconditional one."""
        return self.append(h, self.y_features(y, h.shape[-2], h))

    def top_prior(self, c: torch.Tensor | None = None) -> torch.distributions.Distribution:
        """p(z_L), or p(z_L | y) for a conditional prior, given y's features ``c``
        (:meth:`y_features`; batch shape ``(B,)``)."""
        return self.prior(c) if getattr(self.prior, "conditional", False) else self.prior()

    @property
    def L(self) -> int:
        return len(self.z_dims)

    @property
    def z_dim(self) -> int:
        """The size of z_1, the layer next to the data (the VAE's z)."""
        return self.z_dims[0]

    @property
    def device(self) -> torch.device:
        return first_parameter(self).device

    def check_data(self, x: torch.Tensor) -> torch.Tensor:
        """Raise a clear error for data this model cannot score; return ``x``
        in the model's floating dtype (NumPy's default float64, or half
        precision, is cast: the networks' matmuls need one dtype)."""
        reference = first_parameter(self)
        x = check_batch(x, self.x_dim, reference.device, reference.dtype)
        if is_validation_enabled():
            check_finite(x, "x")
            if getattr(self.likelihood, "binary_data", False) and not ((x == 0) | (x == 1)).all():
                raise ValueError(
                    f"x must be binary (0 or 1) for the {type(self.likelihood).__name__}, got values in "
                    f"[{x.min():.3g}, {x.max():.3g}] with grey levels; binarise the data (--binarize dynamic or "
                    "threshold, pyrovae.data.binarize) or use a likelihood for grey levels "
                    "(--likelihood continuous-bernoulli)"
                )
        return x

    def p_step(self, z_l: torch.Tensor, l: int) -> dist.Distribution:
        """p_theta(z_{l-1} | z_l), l = 2..L."""
        loc, scale = normal_params(self.steps[l - 2](z_l), self.z_dims[l - 2])
        return dist.Normal(loc, scale).to_event(1)

    def bottom_up(self, x: torch.Tensor, y=None) -> list:
        """The top-down encoder's deterministic pass: ``[(mu_hat_l, sigma_hat_l)]``
        for l = 1..L, layer l read from the last hidden layer of layer l - 1's MLP."""
        estimates, h = [], self.with_y(x, y)
        for net, z_dim in zip((self.encoder.net, *self.up), self.z_dims):
            *body, head = net
            for layer in body:
                h = layer(h)
            estimates.append(normal_params(head(h), z_dim))
        return estimates

    def q_top(self, x: torch.Tensor) -> dist.Distribution:
        """q(z_L | x) of the top-down encoder (the VampPrior's components)."""
        return dist.Normal(*self.bottom_up(x)[-1]).to_event(1)

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """p(z_L) prod_l p_theta(z_{l-1}|z_l) p_theta(x|z_1[, y]): the latent sites
        :attr:`sites` from the top down, observed site ``"x"``; returns z_1."""
        params.module(self, self._store_kind)  # a name of its own in the param store
        x = self.check_data(x)
        c = self.y_features(y, x.shape[0], x)  # y checked before any site is drawn, its features made once
        sites = self.sites
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(sites[-1], check_event(self.top_prior(c), "prior", self.z_dims[-1]))
            for l in range(self.L, 1, -1):
                z = pyro.sample(sites[l - 2], self.p_step(z, l))
            pyro.sample("x", self.likelihood(self.decoder(self.append(z, c))), obs=x)
        return z

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """q(z_1..z_L | x[, y]) in the order ``encoder_order`` names; returns z_1."""
        params.module(self, self._store_kind)  # a name of its own in the param store
        x = self.check_data(x)
        sites = self.sites
        with pyro.plate("data", x.shape[0]):
            if self.encoder_order == "top-down" and self.L > 1:
                estimates = self.bottom_up(x, y)
                z = pyro.sample(sites[-1], dist.Normal(*estimates[-1]).to_event(1))
                for l in range(self.L, 1, -1):
                    p = self.p_step(z, l).base_dist
                    z = pyro.sample(
                        sites[l - 2], dist.Normal(*precision_weighted(*estimates[l - 2], p.loc, p.scale)).to_event(1)
                    )
                return z
            z_1 = z = pyro.sample(sites[0], check_event(self.encoder(self.with_y(x, y)), "encoder", self.z_dims[0]))
            for l in range(2, self.L + 1):
                z = pyro.sample(
                    sites[l - 1], dist.Normal(*normal_params(self.up[l - 2](z), self.z_dims[l - 1])).to_event(1)
                )
            return z_1

    @torch.no_grad()
    def bound(
        self, x: torch.Tensor, num_particles: int = 10, batch_size: int = 500, y: torch.Tensor | None = None
    ) -> Bound:
        """The ELBO's named terms per example (:class:`~pyrovae.infer.bound.Bound`,
        module docstring): ``recon`` = E_q log p(x | z_1), ``kl_top`` = kl_L,
        ``kl_layers`` = kl_1 + .. + kl_{L-1} (0 for one layer), ``layers`` =
        ``{"kl_1": .., "kl_L": ..}``, each averaged over ``num_particles``
        vectorised draws of the analytic-KL ELBO (closed form where exact,
        Monte Carlo elsewhere), over ``x`` in batches of ``batch_size``;
        ``closed_form`` lists the layers (1..L) that took the closed form. A
        conditional model's bound is of log p(x | y), given ``y``."""
        elbo = TraceAnalyticKL_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
        dim = self.x_dim if getattr(self.likelihood, "discrete", False) else None
        parts = []
        for i in range(0, len(x), batch_size):
            part = (x[i : i + batch_size],) if y is None else (x[i : i + batch_size], y[i : i + batch_size])
            terms, closed_form = elbo.per_example_terms(self.model, self.guide, *part)
            kls = {f"kl_{l}": -terms[site] for l, site in enumerate(self.sites, start=1)}
            below_top = list(kls.values())[:-1]
            parts.append(
                Bound(
                    recon=terms["x"],
                    kl_top=kls[f"kl_{self.L}"],
                    kl_layers=sum(below_top[1:], below_top[0]) if below_top else terms["x"].new_zeros(()),
                    layers=kls,
                    dim=dim,
                    closed_form=tuple(l for l, site in enumerate(self.sites, start=1) if site in closed_form),
                )
            )
        return Bound.cat(parts)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, num_samples: int = 100, y: torch.Tensor | None = None) -> torch.Tensor:
        """z_1 on the guide's mean path (:meth:`encode_layers`): the posterior
        mean E_q[z|x] of a one-layer model, shape ``(B, z_dims[0])``."""
        return self.encode_layers(x, num_samples, y)[0]

    @torch.no_grad()
    def encode_layers(self, x: torch.Tensor, num_samples: int = 100, y: torch.Tensor | None = None) -> list:
        """The guide's mean path ``[z_1, .., z_L]``: each layer at the mean of its
        q given the layers drawn before it at their means (a summary, not E_q[z_l|x]
        for l > 1 in the bottom-up order); a mean of ``num_samples`` draws where
        q has no closed-form mean (a flow)."""
        with params.unregistered(), poutine.block(), _AtMeans(self.sites, num_samples):
            trace = poutine.trace(self.guide).get_trace(x, y)
        return [trace.nodes[site]["value"] for site in self.sites]

    @torch.no_grad()
    def decode(self, z_1: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The likelihood's mean E[x | z_1[, y]] (pixel probabilities for a Bernoulli)."""
        return self._mean(z_1, self.y_features(y, z_1.shape[-2], z_1))

    def _mean(self, z_1: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        """E[x | z_1[, y]] given y's features ``c`` (:meth:`y_features`)."""
        return self.likelihood(self.decoder(self.append(z_1, c))).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x | z_1[, y]] at the guide's mean path."""
        return self.decode(self.encode(x, y=y), y)

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """n draws of the whole hierarchy z_L ~ p(z_L), z_{l-1} ~ p_theta(z_{l-1}|z_l),
        returned as E[x | z_1[, y]], shape ``(n, x_dim)``; a conditional model
        takes ``n`` conditioning inputs ``y`` (draws of p(x | y))."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        c = self.y_features(y, n, next(self.decoder.parameters()))  # y checked and featurised once
        prior = self.top_prior(c)
        z = prior.sample() if prior.batch_shape else prior.sample((n,))
        for l in range(self.L, 1, -1):
            z = self.p_step(z, l).sample()
        return self._mean(z, c)


class _AtMeans(Messenger):
    """The sample sites named in ``sites`` take their distribution's mean instead
    of a draw (the mean of ``num_samples`` draws where it has no closed-form mean)."""

    def __init__(self, sites, num_samples: int = 100):
        super().__init__()
        self.sites, self.num_samples = set(sites), num_samples

    def _pyro_sample(self, msg):
        if msg["name"] in self.sites:
            try:
                msg["value"] = msg["fn"].mean
            except NotImplementedError:
                msg["value"] = msg["fn"].sample((self.num_samples,)).mean(0)
            msg["done"] = True


class _TopPosterior:
    """q(z_L | x) of a top-down HVAE as the VampPrior's encoder; a plain object
    (not a module) so the HVAE's parameters stay registered once."""

    def __init__(self, hvae: HVAE):
        self._hvae = [hvae]
        self.x_dim = hvae.x_dim

    def __call__(self, x: torch.Tensor) -> dist.Distribution:
        return self._hvae[0].q_top(x)


def _layer_hidden(hidden, L: int) -> list:
    """Per-layer hidden widths: one entry per layer, each an int (one hidden
    layer) or a sequence of ints; a single int or a one-entry sequence is used
    for every layer."""
    if isinstance(hidden, int):
        hidden = (hidden,)
    hidden = list(hidden)
    if len(hidden) == 1:
        hidden = hidden * L
    if len(hidden) != L:
        raise ValueError(f"hidden must give one entry per layer ({L}) or one for all, got {len(hidden)}: {hidden}")
    layers = [tuple(h) if isinstance(h, (list, tuple)) else (h,) for h in hidden]
    if any(not widths or min(widths) < 1 for widths in layers):
        raise ValueError(f"hidden widths must be >= 1 with at least one per layer, got {hidden}")
    return layers


def check_prior(prior, encoder: str, L: int, conditional: bool = True) -> None:
    """The VampPrior p(z_L) = (1/K) sum_k q(z_L | u_k) needs q(z_L | x) in closed
    form: the top-down pass gives it, the bottom-up encoder (L > 1) only as an
    integral over z_1..z_{L-1}; the conditional prior p(z_L | y) needs a
    ``conditional`` model. A ``ValueError`` saying so for those."""
    if prior == "conditional" and not conditional:
        raise ValueError("prior 'conditional' is p(z_L | y): it needs a conditional model (--conditional)")
    if prior == "vamp" and encoder == "bottom-up" and L > 1:
        raise ValueError(
            "prior 'vamp' needs q(z_L | x), which the bottom-up encoder gives only as an integral over "
            "z_1..z_{L-1}; use encoder='top-down' (its deterministic pass gives q(z_L | x) directly) or another prior"
        )


def mlp_nets(x_dim: int, z_dim: int, hidden: tuple, activation: str, image_shape=None, c_dim: int = 0):
    """MLP encoder body ``x_dim (+ c_dim) -> hidden -> out`` and decoder
    ``z_dim (+ c_dim) -> reversed(hidden) -> x_dim``, ``c_dim`` the features of a
    conditioning input y (the CVAE's concatenation)."""
    return (lambda out_dim: MLP(x_dim + c_dim, hidden, out_dim, activation)), MLP(
        z_dim + c_dim, tuple(reversed(hidden)), x_dim, activation
    )


def conv_nets(x_dim: int, z_dim: int, hidden: tuple, activation: str, image_shape=None, c_dim: int = 0):
    """:class:`~pyrovae.nets.ConvEncoderNet` / :class:`~pyrovae.nets.ConvDecoderNet`
    over ``image_shape`` (C, H, W), with ``hidden[0]`` units in their linear layer."""
    if c_dim:
        raise ValueError("a conditional VAE (num_classes or y_shape) concatenates y to its inputs: it needs net 'mlp'")
    if image_shape is None or len(image_shape) != 3 or math.prod(image_shape) != x_dim:
        raise ValueError(f"net 'conv' needs image_shape (C, H, W) with C*H*W = x_dim = {x_dim}, got {image_shape}")
    return (
        lambda out_dim: ConvEncoderNet(image_shape, out_dim, hidden=hidden[0], activation=activation),
        ConvDecoderNet(z_dim, image_shape, hidden=hidden[0], activation=activation),
    )


NETS = {"mlp": mlp_nets, "conv": conv_nets}
"""The first layer's encoder/decoder network pairs by name: ``(x_dim, z_dim,
hidden, activation, image_shape, c_dim) -> (make_encoder_net, decoder)``,
``make_encoder_net(out_dim)`` giving the encoder's body."""


def build_hvae(
    x_dim: int,
    z_dims=(50, 20),
    hidden=(400, 200),
    encoder: str = "bottom-up",
    prior: str | nn.Module = "normal",
    likelihood: str | nn.Module = "bernoulli",
    activation: str = "softplus",
    guide: str | nn.Module = "diag",
    net: str = "mlp",
    image_shape: tuple | None = None,
    num_classes: int | None = None,
    y_shape: tuple | None = None,
) -> HVAE:
    """A hierarchical VAE from parts named in the registries or given as
    modules. Layer l's networks use ``hidden[l-1]``: the encoder's
    ``in -> hidden[l-1] -> 2 z_l`` and the generative step's (the decoder's,
    for l = 1) mirror ``z_l -> reversed(hidden[l-1]) -> out``.

    :param z_dims: sizes of z_1 (next to the data) .. z_L (the top); one entry
        is the VAE (:func:`~pyrovae.vae.build_vae`).
    :param hidden: per-layer widths (see :func:`_layer_hidden`). The default
        (``pyrovae train hvae``'s) is the VAE's x -> 400 -> z_1 (50) with a layer
        z_1 -> 200 -> z_2 (20) on top; the IWAE paper's 2-layer model is
        ``z_dims=(100, 50), hidden=((200, 200), (100, 100))`` (docs/hvae.md
        compares them).
    :param encoder: ``"bottom-up"`` (IWAE paper, the default: measured best
        here) or ``"top-down"`` (Ladder VAE; every KL exact).
    :param prior: p(z_L): a name in :data:`~pyrovae.parts.priors.PRIORS` or a module
        whose ``forward()`` returns p(z_L) with event shape ``(z_dims[-1],)``.
        The VampPrior needs q(z_L | x), which the top-down encoder gives in one
        pass; the bottom-up one gives it only as an integral over z_1..z_{L-1},
        so ``vamp`` with ``bottom-up`` and L > 1 is refused.
    :param likelihood: a name in :data:`~pyrovae.parts.likelihoods.LIKELIHOODS` or a
        module mapping the decoder's ``(..., x_dim)`` output to p(x|z_1) with event
        shape ``(x_dim,)``.
    :param guide: q(z_1 | x): a name in :data:`~pyrovae.parts.encoders.GUIDES` or an
        encoder module ``x -> q(z_1|x)`` (batch ``(B,)``, event ``(z_dims[0],)``);
        the top-down encoder with L > 1 needs ``"diag"`` over the MLP.
    :param net: the first layer's encoder body and decoder, a name in :data:`NETS`
        (``conv`` needs ``image_shape``).
    :param num_classes: / ``y_shape``: the conditional VAE of p(x | y) (module
        docstring), y integer classes in [0, num_classes) or a float tensor of
        shape ``(B, *y_shape)``; needs net ``mlp``, a guide name and a prior
        other than ``vamp`` (whose pseudo-inputs have no y).
    """
    z_dims = tuple(z_dims)
    if not z_dims:
        raise ValueError("z_dims must name at least one layer, got ()")
    check_sizes(x_dim=x_dim, **{f"z_dims[{i}]": z for i, z in enumerate(z_dims)})
    lookup("encoder", encoder, ENCODERS)
    L = len(z_dims)
    check_prior(prior, encoder, L, num_classes is not None or y_shape is not None)
    if encoder == "top-down" and L > 1 and (net != "mlp" or guide != "diag"):
        raise ValueError(
            f"the top-down encoder reads the hidden layers of q(z_1 | x)'s MLP: it needs guide 'diag' and net 'mlp', "
            f"got guide {guide!r} and net {net!r}"
        )
    layers = _layer_hidden(hidden, L)
    conditioning = None if num_classes is None and y_shape is None else Conditioning(num_classes, y_shape)
    c_dim = 0 if conditioning is None else conditioning.dim
    if c_dim and (prior == "vamp" or isinstance(guide, nn.Module)):
        raise ValueError(
            "a conditional VAE (num_classes or y_shape) builds its encoder over (x, y) and keeps p(z_L) free of "
            f"pseudo-inputs: it needs a guide name and a prior other than 'vamp', got guide {guide!r}, prior {prior!r}"
        )
    # The decoder is built first, then the encoder: the initial weights of every model drawn alike.
    make_encoder_net, decoder = lookup("net", net, NETS)(x_dim, z_dims[0], layers[0], activation, image_shape, c_dim)
    if not isinstance(guide, nn.Module):
        guide = lookup("guide", guide, GUIDES, "an nn.Module")(
            x_dim + c_dim, z_dims[0], layers[0], activation, make_encoder_net
        )
    up, steps = [], []
    for l in range(2, L + 1):
        below = layers[l - 2][-1] if encoder == "top-down" else z_dims[l - 2]
        up.append(MLP(below, layers[l - 1], 2 * z_dims[l - 1], activation))
        steps.append(MLP(z_dims[l - 1], tuple(reversed(layers[l - 1])), 2 * z_dims[l - 2], activation))
    if not isinstance(likelihood, nn.Module):
        likelihood = lookup("likelihood", likelihood, LIKELIHOODS, "an nn.Module")(x_dim)
    hvae = HVAE(guide, up, steps, decoder, x_dim, z_dims, None, likelihood, encoder, conditioning)
    if not isinstance(prior, nn.Module):
        # q(z_L | x), which the VampPrior mixes: the encoder itself for one layer
        top_posterior = guide if L == 1 else _TopPosterior(hvae)
        prior = lookup("prior", prior, PRIORS, "an nn.Module")(z_dims[-1], top_posterior, c_dim)
    hvae.prior = prior
    return hvae


def bound_terms(hvae: HVAE, x: torch.Tensor, num_particles: int = 10, batch_size: int = 500) -> dict:
    """:meth:`HVAE.bound`'s means as floats (:meth:`~pyrovae.infer.bound.Bound.summary`)
    and ``closed_form``, the layers that took the closed-form KL, as a list: kept
    for code written before :meth:`HVAE.bound`."""
    bound = hvae.bound(x, num_particles, batch_size)
    return {**bound.summary(), "closed_form": list(bound.closed_form)}


@torch.no_grad()
def active_units(hvae: HVAE, x: torch.Tensor, num_samples: int = 10, threshold: float = 0.01, y=None) -> dict:
    """Active units per layer (Burda et al. 2016): unit u of z_l is active when
    Cov_x(E_q[z_{l,u} | x]) > ``threshold``. E_q[z_l | x] is the mean over
    ``num_samples`` guide draws of the mean of q at layer l given the layers drawn
    before it (exact for the first layer the guide draws). Returns
    ``{l: number of active units}``."""
    with pyro.plate("au_particles", num_samples, dim=-2), poutine.block():
        trace = poutine.trace(hvae.guide).get_trace(x, y)
    means = {l: trace.nodes[site]["fn"].mean for l, site in enumerate(hvae.sites, start=1)}
    return {
        l: int((mean.expand(num_samples, *mean.shape[-2:]).mean(0).var(0) > threshold).sum())
        for l, mean in means.items()
    }
