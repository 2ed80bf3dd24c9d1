"""The hierarchical VAE: L >= 1 stochastic layers as a Pyro model/guide pair.

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

With L = 1 both encoders are q(z_1 | x) and the model is :class:`~pyrovae.vae.VAE`:
``build_hvae(x_dim, z_dims=(z,), hidden=(h,))`` has the same modules, parameter
names and ELBO as ``build_vae(x_dim, z, (h,))`` (tested).

The bound's named terms (per example, nats; :func:`bound_terms`): ``recon`` =
E_q log p(x | z_1); ``kl_l`` = E_q KL(q(z_l | .) || p(z_l | z_{l+1})) for l < L
and ``kl_L`` = KL(q(z_L | .) || p(z_L)) at the top, which is also reported as
``kl_top``; ``kl_layers`` = kl_1 + ... + kl_{L-1}, the layers *below* the top, so
that ``elbo = recon - kl_top - kl_layers`` for every model here (the VAE has
kl_layers = 0; the diffusion chain's kl_layers is its sum of per-t KLs below
L_T).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from torch import nn
from torch.nn.functional import softplus

from pyrovae import params
from pyrovae.infer.analytic_elbo import TraceAnalyticKL_ELBO
from pyrovae.infer.bound import bound_terms as named_terms
from pyrovae.nets import MLP, check_sizes
from pyrovae.parts.encoders import MIN_SCALE, DiagonalNormalEncoder
from pyrovae.parts.likelihoods import LIKELIHOODS, BernoulliLikelihood
from pyrovae.parts.priors import PRIORS, StandardNormalPrior, VampPrior
from pyrovae.vae import VAE, check_event

ENCODERS = ("top-down", "bottom-up")


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
    """A hierarchical VAE composed of replaceable parts.

    :param encoder: module ``x (B, x_dim) -> q(z_1 | x)``, a
        :class:`~pyrovae.parts.encoders.DiagonalNormalEncoder` whose ``net`` is an
        :class:`~pyrovae.nets.MLP` (the top-down pass reads its last hidden layer).
    :param up: L - 1 MLPs, ``up[l-2]`` giving the ``2 * z_dims[l-1]`` parameters of
        layer l from z_{l-1} (bottom-up) or from the previous MLP's last hidden
        layer (top-down).
    :param steps: L - 1 networks, ``steps[l-2]``: z_l -> the ``2 * z_dims[l-2]``
        parameters of p_theta(z_{l-1} | z_l).
    :param decoder: module ``z_1 -> parameters`` of the likelihood.
    :param z_dims: sizes of z_1 .. z_L.
    :param prior: module ``() -> p(z_L)``, event shape ``(z_dims[-1],)``; default N(0, I).
    :param likelihood: module, decoder output -> p_theta(x | z_1); default Bernoulli.
    :param encoder_order: ``"top-down"`` or ``"bottom-up"`` (module docstring).

    Parameter names for L = 1 are the VAE's (``encoder.*``, ``decoder.*``,
    ``prior.*``, ``likelihood.*``), so a VAE's state dict loads into it.
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
    ):
        super().__init__()
        z_dims = tuple(int(z) for z in z_dims)
        if not z_dims:
            raise ValueError("z_dims must name at least one layer, got ()")
        check_sizes(x_dim=x_dim, **{f"z_dims[{i}]": z for i, z in enumerate(z_dims)})
        if encoder_order not in ENCODERS:
            raise ValueError(f"unknown encoder {encoder_order!r}; expected one of {', '.join(ENCODERS)}")
        if len(up) != len(z_dims) - 1 or len(steps) != len(z_dims) - 1:
            raise ValueError(
                f"{len(z_dims)} layers need {len(z_dims) - 1} up and step networks, got {len(up)} and {len(steps)}"
            )
        self.x_dim, self.z_dims, self.encoder_order = x_dim, z_dims, encoder_order
        self.encoder, self.decoder = encoder, decoder
        self.up, self.steps = nn.ModuleList(up), nn.ModuleList(steps)
        self.prior = prior if prior is not None else StandardNormalPrior(z_dims[-1])
        self.likelihood = likelihood if likelihood is not None else BernoulliLikelihood()

    # the VAE's data contract and device lookup, unchanged
    check_data = VAE.check_data
    device = VAE.device

    @property
    def L(self) -> int:
        return len(self.z_dims)

    def p_step(self, z_l: torch.Tensor, l: int) -> dist.Distribution:
        """p_theta(z_{l-1} | z_l), l = 2..L."""
        loc, scale = normal_params(self.steps[l - 2](z_l), self.z_dims[l - 2])
        return dist.Normal(loc, scale).to_event(1)

    def bottom_up(self, x: torch.Tensor) -> list:
        """The top-down encoder's deterministic pass: ``[(mu_hat_l, sigma_hat_l)]``
        for l = 1..L, layer l read from the last hidden layer of layer l - 1's MLP."""
        estimates, h = [], x
        for net, z_dim in zip((self.encoder.net, *self.up), self.z_dims):
            *body, head = net
            for layer in body:
                h = layer(h)
            estimates.append(normal_params(head(h), z_dim))
        return estimates

    def q_top(self, x: torch.Tensor) -> dist.Distribution:
        """q(z_L | x) of the top-down encoder (the VampPrior's components)."""
        return dist.Normal(*self.bottom_up(x)[-1]).to_event(1)

    def model(self, x: torch.Tensor) -> torch.Tensor:
        """p(z_L) prod_l p_theta(z_{l-1}|z_l) p_theta(x|z_1): sample sites ``"z_L"`` ..
        ``"z_1"``, observed site ``"x"``."""
        params.module(self, "hvae")  # a name of its own in the param store
        x = self.check_data(x)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(f"z_{self.L}", check_event(self.prior(), "prior", self.z_dims[-1]))
            for l in range(self.L, 1, -1):
                z = pyro.sample(f"z_{l - 1}", self.p_step(z, l))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)
        return z

    def guide(self, x: torch.Tensor) -> None:
        """q(z_1..z_L | x) in the order ``encoder_order`` names."""
        params.module(self, "hvae")  # a name of its own in the param store
        x = self.check_data(x)
        with pyro.plate("data", x.shape[0]):
            if self.encoder_order == "bottom-up":
                z = pyro.sample("z_1", check_event(self.encoder(x), "encoder", self.z_dims[0]))
                for l in range(2, self.L + 1):
                    z = pyro.sample(
                        f"z_{l}", dist.Normal(*normal_params(self.up[l - 2](z), self.z_dims[l - 1])).to_event(1)
                    )
                return
            estimates = self.bottom_up(x)
            z = pyro.sample(f"z_{self.L}", dist.Normal(*estimates[-1]).to_event(1))
            for l in range(self.L, 1, -1):
                p = self.p_step(z, l).base_dist
                z = pyro.sample(
                    f"z_{l - 1}", dist.Normal(*precision_weighted(*estimates[l - 2], p.loc, p.scale)).to_event(1)
                )

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> list:
        """The guide's mean path ``[z_1, .., z_L]``: each layer at the mean of its
        q given the layers drawn before it at their means (a summary, not E_q[z_l|x]
        for l > 1 in the bottom-up order)."""
        with poutine.block(), _AtMeans(f"z_{l}" for l in range(1, self.L + 1)):
            trace = poutine.trace(self.guide).get_trace(x)
        return [trace.nodes[f"z_{l}"]["value"] for l in range(1, self.L + 1)]

    @torch.no_grad()
    def decode(self, z_1: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean E[x | z_1]."""
        return self.likelihood(self.decoder(z_1)).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z_1] at the guide's mean path."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n draws of the whole hierarchy z_L ~ p(z_L), z_{l-1} ~ p_theta(z_{l-1}|z_l),
        returned as E[x | z_1], shape ``(n, x_dim)``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        z = self.prior().sample((n,))
        for l in range(self.L, 1, -1):
            z = self.p_step(z, l).sample()
        return self.decode(z)


class _AtMeans(Messenger):
    """The sample sites named in ``sites`` take their distribution's mean instead of a draw."""

    def __init__(self, sites):
        super().__init__()
        self.sites = set(sites)

    def _pyro_sample(self, msg):
        if msg["name"] in self.sites:
            msg["value"] = msg["fn"].mean
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


def check_prior(prior, encoder: str, L: int) -> None:
    """The VampPrior p(z_L) = (1/K) sum_k q(z_L | u_k) needs q(z_L | x) in closed
    form: the top-down pass gives it, the bottom-up encoder (L > 1) only as an
    integral over z_1..z_{L-1}. A ``ValueError`` saying so for that pair."""
    if prior == "vamp" and encoder == "bottom-up" and L > 1:
        raise ValueError(
            "prior 'vamp' needs q(z_L | x), which the bottom-up encoder gives only as an integral over "
            "z_1..z_{L-1}; use encoder='top-down' (its deterministic pass gives q(z_L | x) directly) or another prior"
        )


def build_hvae(
    x_dim: int,
    z_dims=(50, 20),
    hidden=(400, 200),
    encoder: str = "bottom-up",
    prior: str | nn.Module = "normal",
    likelihood: str | nn.Module = "bernoulli",
    activation: str = "softplus",
) -> HVAE:
    """A hierarchical VAE of MLPs. Layer l's networks use ``hidden[l-1]``: the
    encoder's ``in -> hidden[l-1] -> 2 z_l`` and the generative step's (the
    decoder's, for l = 1) mirror ``z_l -> reversed(hidden[l-1]) -> out``.

    :param z_dims: sizes of z_1 (next to the data) .. z_L (the top).
    :param hidden: per-layer widths (see :func:`_layer_hidden`). The default
        (``pyrovae train hvae``'s) is the VAE's x -> 400 -> z_1 (50) with a layer
        z_1 -> 200 -> z_2 (20) on top; the IWAE paper's 2-layer model is
        ``z_dims=(100, 50), hidden=((200, 200), (100, 100))`` (docs/hvae.md
        compares them).
    :param encoder: ``"bottom-up"`` (IWAE paper, the default: measured best
        here) or ``"top-down"`` (Ladder VAE; every KL exact).
    :param prior: p(z_L): a name in :data:`~pyrovae.parts.priors.PRIORS` or a module.
        The VampPrior needs q(z_L | x), which the top-down encoder gives in one
        pass; the bottom-up one gives it only as an integral over z_1..z_{L-1},
        so ``vamp`` with ``bottom-up`` and L > 1 is refused.
    :param likelihood: a name in :data:`~pyrovae.parts.likelihoods.LIKELIHOODS` or a module.
    """
    z_dims = tuple(z_dims)
    if not z_dims:
        raise ValueError("z_dims must name at least one layer, got ()")
    check_sizes(x_dim=x_dim, **{f"z_dims[{i}]": z for i, z in enumerate(z_dims)})
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; expected one of {', '.join(ENCODERS)}")
    check_prior(prior, encoder, len(z_dims))
    layers = _layer_hidden(hidden, len(z_dims))
    # Construction order as build_vae's (decoder first), so that L = 1 draws the same initial weights.
    decoder = MLP(z_dims[0], tuple(reversed(layers[0])), x_dim, activation)
    first = DiagonalNormalEncoder(x_dim, z_dims[0], layers[0], activation)
    up, steps = [], []
    for l in range(2, len(z_dims) + 1):
        below = layers[l - 2][-1] if encoder == "top-down" else z_dims[l - 2]
        up.append(MLP(below, layers[l - 1], 2 * z_dims[l - 1], activation))
        steps.append(MLP(z_dims[l - 1], tuple(reversed(layers[l - 1])), 2 * z_dims[l - 2], activation))
    if not isinstance(likelihood, nn.Module):
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"unknown likelihood {likelihood!r}; expected one of {', '.join(LIKELIHOODS)} or an nn.Module"
            )
        likelihood = LIKELIHOODS[likelihood](x_dim)
    hvae = HVAE(first, up, steps, decoder, x_dim, z_dims, None, likelihood, encoder)
    if isinstance(prior, nn.Module):
        hvae.prior = prior
    elif prior == "vamp":
        hvae.prior = VampPrior(_TopPosterior(hvae))
    elif prior in PRIORS:
        hvae.prior = PRIORS[prior](z_dims[-1], None)
    else:
        raise ValueError(f"unknown prior {prior!r}; expected one of {', '.join(PRIORS)} or an nn.Module")
    return hvae


def latent_sites(model) -> list:
    """The latent sites from z_1 (next to the data) to the top: ``["z_1", .., "z_L"]``
    for an :class:`HVAE`, ``["z"]`` for a :class:`~pyrovae.vae.VAE` (its one layer)."""
    return [f"z_{l}" for l in range(1, model.L + 1)] if isinstance(model, HVAE) else ["z"]


@torch.no_grad()
def bound_terms(hvae: HVAE | VAE, x: torch.Tensor, num_particles: int = 10, batch_size: int = 500) -> dict:
    """The ELBO's named terms (:mod:`pyrovae.infer.bound`), per example in nats,
    averaged over ``x``: ``recon``, ``kl_top`` (= kl_L), ``kl_layers``
    (= kl_1 + .. + kl_{L-1}, for L > 1), ``elbo`` = recon - kl_top - kl_layers,
    ``bpd`` for a likelihood that is a probability mass function, and
    ``kl_1`` .. ``kl_L``, each from ``num_particles`` vectorised draws of the analytic-KL
    ELBO (closed form where exact, Monte Carlo elsewhere); ``closed_form`` lists
    the layers that took the closed form. A :class:`~pyrovae.vae.VAE` is read as
    the 1-layer hierarchy (its ``z`` is z_1 = the top)."""
    elbo = TraceAnalyticKL_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    sums: dict = {}
    for i in range(0, len(x), batch_size):
        terms = elbo.terms(hvae.model, hvae.guide, x[i : i + batch_size])
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value
    sites = latent_sites(hvae)
    n, L = len(x), len(sites)
    kls = {f"kl_{l}": -sums[site] / n for l, site in enumerate(sites, start=1)}
    dim = hvae.x_dim if getattr(hvae.likelihood, "discrete", False) else None
    below_top = sum(kls[f"kl_{l}"] for l in range(1, L)) if L > 1 else None
    out = {**named_terms(sums["x"] / n, kls[f"kl_{L}"], below_top, dim), **kls}
    out["closed_form"] = [l for l, site in enumerate(sites, start=1) if site in terms.closed_form]
    return out


@torch.no_grad()
def active_units(hvae: HVAE | VAE, x: torch.Tensor, num_samples: int = 10, threshold: float = 0.01) -> dict:
    """Active units per layer (Burda et al. 2016): unit u of z_l is active when
    Cov_x(E_q[z_{l,u} | x]) > ``threshold``. E_q[z_l | x] is the mean over
    ``num_samples`` guide draws of the mean of q at layer l given the layers drawn
    before it (exact for the first layer the guide draws). Returns
    ``{l: number of active units}``."""
    with pyro.plate("au_particles", num_samples, dim=-2), poutine.block():
        trace = poutine.trace(hvae.guide).get_trace(x)
    means = {l: trace.nodes[site]["fn"].mean for l, site in enumerate(latent_sites(hvae), start=1)}
    return {
        l: int((mean.expand(num_samples, *mean.shape[-2:]).mean(0).var(0) > threshold).sum())
        for l, mean in means.items()
    }
