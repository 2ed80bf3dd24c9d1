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

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.nets import MLP
from pyrovae.vae.encoders import DiagonalNormalEncoder
from pyrovae.vae.likelihoods import BernoulliLikelihood
from pyrovae.vae.priors import StandardNormalPrior


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

    The VAE registers itself with ``pyro.module("vae", self)`` in both the model
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
        if z_dim < 1:
            raise ValueError(f"z_dim must be >= 1, got {z_dim}")
        if x_dim < 1:
            raise ValueError(f"x_dim must be >= 1, got {x_dim}")
        self.x_dim, self.z_dim = x_dim, z_dim
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior if prior is not None else StandardNormalPrior(z_dim)
        self.likelihood = likelihood if likelihood is not None else BernoulliLikelihood()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def check_data(self, x: torch.Tensor) -> torch.Tensor:
        """Raise a clear error for data this model cannot score; return ``x``."""
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.x_dim:
            raise ValueError(
                f"x must have shape (batch, {self.x_dim}) (flattened examples), got {tuple(x.shape)}"
            )
        if x.shape[0] == 0:
            raise ValueError("x is empty (batch size 0)")
        if not x.is_floating_point():
            raise TypeError(f"x must be a float tensor scaled to [0, 1], got dtype {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the model is on {self.device}; move one with .to()")
        return x

    def model(self, x: torch.Tensor) -> torch.Tensor:
        """p(z) p_theta(x|z): sample site ``"z"``, observed site ``"x"``."""
        pyro.module("vae", self)
        self.check_data(x)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)
        return z

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        """q_phi(z|x): sample site ``"z"``."""
        pyro.module("vae", self)
        self.check_data(x)
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("z", self.encoder(x))

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean E_q[z|x], shape ``(B, z_dim)``."""
        return self.encoder(self.check_data(x)).mean

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


def build_vae(x_dim: int, z_dim: int = 50, hidden: tuple = (400,), activation: str = "softplus") -> VAE:
    """The default VAE: MLP encoder ``x_dim -> hidden -> 2 z_dim`` giving a diagonal
    Normal q_phi(z|x), MLP decoder ``z_dim -> hidden -> x_dim`` giving Bernoulli
    logits, and p(z) = N(0, I)."""
    return VAE(
        encoder=DiagonalNormalEncoder(x_dim, z_dim, hidden, activation),
        decoder=MLP(z_dim, tuple(reversed(hidden)), x_dim, activation),
        x_dim=x_dim,
        z_dim=z_dim,
    )
