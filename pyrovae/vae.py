"""The variational autoencoder as a Pyro model/guide pair.

Generative story (``model``), for each example x in the batch::

    z ~ p(z)                          prior,   event shape (z_dim,)
    x ~ p_theta(x | z)                likelihood(decoder(z)), event shape (x_dim,)

Inference network (``guide``)::

    z ~ q_phi(z | x)                  encoder(x)

so that ``SVI(vae.model, vae.guide, optim, Trace_ELBO())`` maximises

    ELBO(x) = E_q[log p_theta(x|z)] - KL(q_phi(z|x) || p(z))  <=  log p_theta(x).
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn

from pyrovae import params
from pyrovae.checks import check_finite
from pyrovae.nets import MLP, ConvDecoderNet, ConvEncoderNet, check_sizes, first_parameter
from pyrovae.parts.encoders import GUIDES
from pyrovae.parts.likelihoods import LIKELIHOODS, BernoulliLikelihood
from pyrovae.parts.priors import PRIORS, StandardNormalPrior


def check_event(d, part: str, z_dim: int):
    """``d`` if its event shape is ``(z_dim,)``, else a ``ValueError`` naming
    the part (before the decoder fails on a raw matrix-size error)."""
    if tuple(d.event_shape) != (z_dim,):
        raise ValueError(
            f"the {part} must return a distribution with event shape (z_dim,) = ({z_dim},), got event shape {tuple(d.event_shape)}"
        )
    return d


class VAE(nn.Module):
    """A VAE composed of four replaceable parts.

    :param encoder: module, ``x (B, x_dim) -> q_phi(z|x)`` with batch shape ``(B,)``
        and event shape ``(z_dim,)``.
    :param decoder: module, ``z (B, z_dim) -> parameters`` for the likelihood.
    :param prior: module, ``() -> p(z)`` with event shape ``(z_dim,)``;
        default :class:`StandardNormalPrior`.
    :param likelihood: module, ``decoder output -> p_theta(x|z)`` with event
        shape ``(x_dim,)``; default :class:`BernoulliLikelihood`.
    :param x_dim: size of one flattened example; :meth:`model` and :meth:`guide`
        check the data against it.
    :param z_dim: size of the latent.

    The VAE registers itself with ``pyro.module`` under a name of its own
    (:func:`pyrovae.params.module`) in both the model
    and the guide, so every parameter of the four parts, the prior's included,
    is in Pyro's param store and trained by SVI.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        x_dim: int,
        z_dim: int,
        prior: nn.Module | None = None,
        likelihood: nn.Module | None = None,
    ):
        super().__init__()
        check_sizes(x_dim=x_dim, z_dim=z_dim)
        self.x_dim, self.z_dim = x_dim, z_dim
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior if prior is not None else StandardNormalPrior(z_dim)
        self.likelihood = likelihood if likelihood is not None else BernoulliLikelihood()

    @property
    def device(self) -> torch.device:
        return first_parameter(self).device

    def check_data(self, x: torch.Tensor) -> torch.Tensor:
        """Raise a clear error for data this model cannot score; return ``x``
        in the model's floating dtype (NumPy's default float64, or half
        precision, is cast: the networks' matmuls need one dtype)."""
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.x_dim:
            raise ValueError(f"x must have shape (batch, {self.x_dim}) (flattened examples), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("x is empty (batch size 0)")
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor scaled to [0, 1], got dtype {x.dtype}")
        reference = first_parameter(self)
        if x.device != reference.device:
            raise ValueError(f"x is on {x.device} but the model is on {reference.device}; move one with .to()")
        if x.dtype != reference.dtype:
            x = x.to(reference.dtype)
        if is_validation_enabled():
            check_finite(x, "x")
            if getattr(self.likelihood, "binary_data", False) and not ((x == 0) | (x == 1)).all():
                raise ValueError(
                    f"x must be binary (0 or 1) for the {type(self.likelihood).__name__}, got values in "
                    f"[{x.min():.3g}, {x.max():.3g}] with grey levels; binarise the data (--binarize dynamic or "
                    "threshold, pyrovae.data.binarize) or use a likelihood for grey levels (--likelihood continuous-bernoulli)"
                )
        return x

    def model(self, x: torch.Tensor) -> torch.Tensor:
        """p(z) p_theta(x|z): sample site ``"z"``, observed site ``"x"``."""
        params.module(self, "vae")  # a name of its own in the param store
        x = self.check_data(x)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", check_event(self.prior(), "prior", self.z_dim))
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)
        return z

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        """q_phi(z|x): sample site ``"z"``."""
        params.module(self, "vae")  # a name of its own in the param store
        x = self.check_data(x)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", check_event(self.encoder(x), "encoder", self.z_dim))

    @torch.no_grad()
    def encode(self, x: torch.Tensor, num_samples: int = 100) -> torch.Tensor:
        """The posterior mean E_q[z|x], shape ``(B, z_dim)``; a mean of
        ``num_samples`` draws where q has no closed-form mean (a flow)."""
        q = self.encoder(self.check_data(x))
        try:
            return q.mean
        except NotImplementedError:
            return q.sample((num_samples,)).mean(0)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean E[x|z] (pixel probabilities for a Bernoulli)."""
        return self.likelihood(self.decoder(z)).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x | z = E_q[z|x]]: decode the posterior mean."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n draws z ~ p(z), returned as E[x|z], shape ``(n, x_dim)``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        return self.decode(self.prior().sample((n,)))


def mlp_nets(x_dim: int, z_dim: int, hidden: tuple, activation: str, image_shape=None):
    """MLP encoder body ``x_dim -> hidden -> out`` and decoder ``z_dim -> reversed(hidden) -> x_dim``."""
    return (lambda out_dim: MLP(x_dim, hidden, out_dim, activation)), MLP(
        z_dim, tuple(reversed(hidden)), x_dim, activation
    )


def conv_nets(x_dim: int, z_dim: int, hidden: tuple, activation: str, image_shape=None):
    """:class:`~pyrovae.nets.ConvEncoderNet` / :class:`~pyrovae.nets.ConvDecoderNet`
    over ``image_shape`` (C, H, W), with ``hidden[0]`` units in their linear layer."""
    if image_shape is None or len(image_shape) != 3 or math.prod(image_shape) != x_dim:
        raise ValueError(f"net 'conv' needs image_shape (C, H, W) with C*H*W = x_dim = {x_dim}, got {image_shape}")
    return (
        lambda out_dim: ConvEncoderNet(image_shape, out_dim, hidden=hidden[0], activation=activation),
        ConvDecoderNet(z_dim, image_shape, hidden=hidden[0], activation=activation),
    )


NETS = {"mlp": mlp_nets, "conv": conv_nets}
"""Encoder/decoder network pairs by name: ``(x_dim, z_dim, hidden, activation,
image_shape) -> (make_encoder_net, decoder)``, ``make_encoder_net(out_dim)``
giving the encoder's body."""


def _lookup(kind: str, name, registry: dict):
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; expected one of {', '.join(registry)} or an nn.Module")
    return registry[name]


def build_vae(
    x_dim: int,
    z_dim: int = 50,
    hidden: tuple = (400,),
    activation: str = "softplus",
    prior: str | nn.Module = "normal",
    guide: str | nn.Module = "diag",
    likelihood: str | nn.Module = "bernoulli",
    net: str = "mlp",
    image_shape: tuple | None = None,
) -> VAE:
    """A VAE from parts named in the registries or given as modules.

    :param prior: a name in :data:`~pyrovae.parts.priors.PRIORS` or a module whose
        ``forward()`` returns p(z) with event shape ``(z_dim,)``.
    :param guide: a name in :data:`~pyrovae.parts.encoders.GUIDES` or an encoder
        module ``x -> q(z|x)`` (batch ``(B,)``, event ``(z_dim,)``).
    :param likelihood: a name in :data:`~pyrovae.parts.likelihoods.LIKELIHOODS` or a
        module mapping the decoder's ``(..., x_dim)`` output to p(x|z) with event
        shape ``(x_dim,)``.
    :param net: ``mlp`` or ``conv`` (``conv`` needs ``image_shape``): the
        encoder's body and the decoder.

    The default, ``build_vae(784)``, is an MLP ``784 -> 400 -> 2 z_dim`` giving a
    diagonal Normal q_phi(z|x), an MLP ``z_dim -> 400 -> 784`` giving Bernoulli
    logits, and p(z) = N(0, I).
    """
    check_sizes(x_dim=x_dim, z_dim=z_dim)
    make_encoder_net, decoder = _lookup("net", net, NETS)(x_dim, z_dim, tuple(hidden), activation, image_shape)
    if isinstance(guide, nn.Module):
        encoder = guide
    else:
        encoder = _lookup("guide", guide, GUIDES)(x_dim, z_dim, hidden, activation, make_encoder_net)
    if not isinstance(prior, nn.Module):
        prior = _lookup("prior", prior, PRIORS)(z_dim, encoder)
    if not isinstance(likelihood, nn.Module):
        likelihood = _lookup("likelihood", likelihood, LIKELIHOODS)(x_dim)
    return VAE(encoder, decoder, x_dim, z_dim, prior, likelihood)
