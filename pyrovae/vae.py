"""The variational autoencoder: the one-layer hierarchical VAE (:mod:`pyrovae.hvae`).

Generative story (``model``), for each example x in the batch::

    z ~ p(z)                          prior,   event shape (z_dim,)
    x ~ p_theta(x | z)                likelihood(decoder(z)), event shape (x_dim,)

Inference network (``guide``)::

    z ~ q_phi(z | x)                  encoder(x)

so that ``SVI(vae.model, vae.guide, optim, Trace_ELBO())`` maximises

    ELBO(x) = E_q[log p_theta(x|z)] - KL(q_phi(z|x) || p(z))  <=  log p_theta(x).

:func:`build_vae` is :func:`~pyrovae.hvae.build_hvae` with one layer and
:class:`VAE` is :class:`~pyrovae.hvae.HVAE` built from the VAE's four parts:
the model, its sample site ``"z"``, its parameter names and its numbers are the
HVAE's with L = 1.
"""

from __future__ import annotations

from torch import nn

from pyrovae.hvae import HVAE, NETS, build_hvae, check_event  # noqa: F401 (NETS, check_event: their old home)
from pyrovae.nets import check_sizes


class VAE(HVAE):
    """The one-layer :class:`~pyrovae.hvae.HVAE`, built from the VAE's parts.

    :param encoder: module, ``x (B, x_dim) -> q_phi(z|x)`` with batch shape ``(B,)``
        and event shape ``(z_dim,)``.
    :param decoder: module, ``z (B, z_dim) -> parameters`` for the likelihood.
    :param prior: module, ``() -> p(z)`` with event shape ``(z_dim,)``;
        default :class:`~pyrovae.parts.priors.StandardNormalPrior`.
    :param likelihood: module, ``decoder output -> p_theta(x|z)`` with event
        shape ``(x_dim,)``; default :class:`~pyrovae.parts.likelihoods.BernoulliLikelihood`.
    :param x_dim: size of one flattened example; :meth:`model` and :meth:`guide`
        check the data against it.
    :param z_dim: size of the latent.
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
        check_sizes(x_dim=x_dim, z_dim=z_dim)
        super().__init__(encoder, (), (), decoder, x_dim, (z_dim,), prior, likelihood)


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
    num_classes: int | None = None,
    y_shape: tuple | None = None,
) -> HVAE:
    """A VAE from parts named in the registries or given as modules:
    :func:`~pyrovae.hvae.build_hvae` with the one layer ``z_dims=(z_dim,)`` whose
    networks have the hidden widths ``hidden``.

    :param prior: a name in :data:`~pyrovae.parts.priors.PRIORS` or a module whose
        ``forward()`` returns p(z) with event shape ``(z_dim,)``.
    :param guide: a name in :data:`~pyrovae.parts.encoders.GUIDES` or an encoder
        module ``x -> q(z|x)`` (batch ``(B,)``, event ``(z_dim,)``).
    :param likelihood: a name in :data:`~pyrovae.parts.likelihoods.LIKELIHOODS` or a
        module mapping the decoder's ``(..., x_dim)`` output to p(x|z) with event
        shape ``(x_dim,)``.
    :param net: ``mlp`` or ``conv`` (``conv`` needs ``image_shape``): the
        encoder's body and the decoder.
    :param num_classes: / ``y_shape``: the conditional VAE (CVAE) of p(x | y)
        (:func:`~pyrovae.hvae.build_hvae`).

    The default, ``build_vae(784)``, is an MLP ``784 -> 400 -> 2 z_dim`` giving a
    diagonal Normal q_phi(z|x), an MLP ``z_dim -> 400 -> 784`` giving Bernoulli
    logits, and p(z) = N(0, I).
    """
    check_sizes(x_dim=x_dim, z_dim=z_dim)
    return build_hvae(
        x_dim,
        (z_dim,),
        (tuple(hidden),),
        prior=prior,
        likelihood=likelihood,
        activation=activation,
        guide=guide,
        net=net,
        image_shape=image_shape,
        num_classes=num_classes,
        y_shape=y_shape,
    )
