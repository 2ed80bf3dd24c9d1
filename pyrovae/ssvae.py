"""The semi-supervised VAE (M2 of Kingma, Rezende, Mohamed & Welling 2014) as a Pyro model/guide pair.

Generative story (``model``), for each example x in the batch::

    y ~ Cat(pi)                       the class, observed where a label is given
    z ~ p(z)                          prior, event shape (z_dim,)
    x ~ p_theta(x | y, z)             likelihood(decoder([z, onehot(y)])), event shape (x_dim,)

Inference network (``guide``)::

    y ~ q_phi(y | x)                  classifier(x), only where y is not given, marked for parallel enumeration
    z ~ q_phi(z | x, y)               encoder([x, onehot(y)])

For a labelled pair the ELBO is the ordinary bound on log p(x, y),

    L(x, y) = E_q log p_theta(x|y,z) - KL(q_phi(z|x,y) || p(z)) + log p(y),

and for an unlabelled x it sums over y exactly,

    U(x) = sum_y q_phi(y|x) [E_q log p_theta(x|y,z) - KL(q_phi(z|x,y) || p(z)) + log p(y)] + H(q_phi(y|x))
         = sum_y q_phi(y|x) L(x, y) + H(q_phi(y|x))  <=  log p_theta(x),

which :class:`~pyrovae.infer.TraceAnalyticKL_ELBO` computes with every KL in
closed form (``TraceEnum_ELBO`` also sums y, with the KL sampled).

q_phi(y|x) gets no gradient from labelled pairs through L, so the paper adds
the classification term alpha * log q_phi(y|x) on labelled pairs. It is not
part of any bound: :meth:`SSVAE.auxiliary_loss` returns it apart (and
:meth:`SSVAE.model_classify` / :meth:`SSVAE.guide_classify` give it to a second
``SVI``, as Pyro's ``examples/vae/ss_vae_M2.py`` does); the objective trained is
-(sum of U and L) + auxiliary loss, never called an ELBO.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.util import is_validation_enabled
from torch import nn
from torch.nn.functional import one_hot

from pyrovae import params
from pyrovae.checks import check_batch, check_finite
from pyrovae.infer.analytic_elbo import TraceAnalyticKL_ELBO
from pyrovae.nets import MLP, check_sizes, first_parameter
from pyrovae.parts.encoders import DiagonalNormalEncoder
from pyrovae.parts.likelihoods import BernoulliLikelihood
from pyrovae.parts.priors import StandardNormalPrior


class SSVAE(nn.Module):
    """M2: a class y and a style z generate x; the guide classifies.

    :param x_dim: size of one flattened example.
    :param num_classes: K, the number of classes; labels are integers in [0, K).
    :param z_dim: size of the latent z.
    :param hidden: hidden layer sizes of the classifier q_phi(y|x), the
        encoder q_phi(z|x,y) and (reversed) the decoder.
    :param activation: the networks' activation (:data:`pyrovae.nets.ACTIVATIONS`).
    :param aux_weight: alpha, the weight of the classification term
        alpha * log q_phi(y|x) on labelled pairs (:meth:`auxiliary_loss`);
        Kingma et al. use 0.1 N, Pyro's example 46.
    :param prior: module ``() -> p(z)`` with event shape ``(z_dim,)``; default N(0, I).
    :param likelihood: module mapping the decoder's output to p_theta(x|y,z)
        with event shape ``(x_dim,)``; default Bernoulli (binary x).

    p(y) = Cat(pi) with pi uniform (a buffer ``class_logits``). The model
    registers itself with ``pyro.module`` under a name of its own
    (:func:`pyrovae.params.module`): two SSVAEs in one process train apart.
    """

    def __init__(
        self,
        x_dim: int,
        num_classes: int,
        z_dim: int = 50,
        hidden: tuple = (500,),
        activation: str = "softplus",
        aux_weight: float = 46.0,
        prior: nn.Module | None = None,
        likelihood: nn.Module | None = None,
    ):
        super().__init__()
        check_sizes(x_dim=x_dim, z_dim=z_dim)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.x_dim, self.z_dim, self.num_classes = x_dim, z_dim, num_classes
        self.aux_weight = aux_weight
        self.classifier = MLP(x_dim, tuple(hidden), num_classes, activation)
        self.encoder = DiagonalNormalEncoder(x_dim + num_classes, z_dim, tuple(hidden), activation)
        self.decoder = MLP(z_dim + num_classes, tuple(reversed(hidden)), x_dim, activation)
        self.prior = prior if prior is not None else StandardNormalPrior(z_dim)
        self.likelihood = likelihood if likelihood is not None else BernoulliLikelihood()
        self.register_buffer("class_logits", torch.zeros(num_classes))

    @property
    def aux_weight(self) -> float:
        return self._aux_weight

    @aux_weight.setter
    def aux_weight(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"aux_weight must be a number >= 0, got {value!r}")
        self._aux_weight = float(value)

    def check_data(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` in the model's dtype, after a clear error for data it cannot
        score: shape ``(B, x_dim)``, floating point, on the model's device,
        binary for a Bernoulli likelihood and ``y`` (if given) integer classes
        of shape ``(B,)`` in [0, K) (the value checks under validation)."""
        reference = first_parameter(self)
        x = check_batch(x, self.x_dim, reference.device, reference.dtype)
        if y is not None:
            if not torch.is_tensor(y) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                given = y.dtype if torch.is_tensor(y) else type(y).__name__
                raise TypeError(f"y must be an integer tensor of classes in [0, {self.num_classes}), got {given}")
            if y.shape != x.shape[:1]:
                raise ValueError(f"y must have shape (batch,) = ({x.shape[0]},), one class per x, got {tuple(y.shape)}")
        if is_validation_enabled():
            check_finite(x, "x")
            if getattr(self.likelihood, "binary_data", False) and not ((x == 0) | (x == 1)).all():
                raise ValueError(
                    f"x must be binary (0 or 1) for the {type(self.likelihood).__name__}; binarise it "
                    "(pyrovae.data.binarize) or use a likelihood for grey levels"
                )
            if y is not None and not ((y >= 0) & (y < self.num_classes)).all():
                raise ValueError(
                    f"y must hold classes in [0, {self.num_classes}), got values in [{int(y.min())}, {int(y.max())}]"
                )
        return x

    def _with_class(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[h, onehot(y)] along the last dimension, their batch shapes
        broadcast: under enumeration y is ``(K, 1)`` against h's ``(B, d)``
        (or ``(K, B, d)``), giving ``(K, B, d + K)``."""
        y = one_hot(y, self.num_classes).to(h.dtype)
        batch = torch.broadcast_shapes(h.shape[:-1], y.shape[:-1])
        return torch.cat([h.expand(*batch, h.shape[-1]), y.expand(*batch, self.num_classes)], -1)

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """p(y) p(z) p_theta(x|y,z): sample sites ``"y"`` (observed when y is
        given), ``"z"``, observed site ``"x"``."""
        params.module(self, "ssvae")
        x = self.check_data(x, y)
        with pyro.plate("data", x.shape[0]):
            y = pyro.sample("y", dist.Categorical(logits=self.class_logits), obs=y)
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(self.decoder(self._with_class(z, y))), obs=x)
        return z

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """q_phi(y|x) where y is not given (site ``"y"``, marked
        ``infer={"enumerate": "parallel"}``: summed over by
        ``TraceAnalyticKL_ELBO`` and ``TraceEnum_ELBO``, sampled by
        ``Trace_ELBO``), then q_phi(z|x,y) (site ``"z"``)."""
        params.module(self, "ssvae")
        x = self.check_data(x, y)
        with pyro.plate("data", x.shape[0]):
            if y is None:
                y = pyro.sample("y", dist.Categorical(logits=self.classifier(x)), infer={"enumerate": "parallel"})
            return pyro.sample("z", self.encoder(self._with_class(x, y)))

    def auxiliary_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """-alpha * sum_n log q_phi(y_n|x_n) over labelled pairs: the paper's
        classification term, not part of the bound."""
        x = self.check_data(x, y)
        return -self.aux_weight * dist.Categorical(logits=self.classifier(x)).log_prob(y).sum()

    def model_classify(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """:meth:`auxiliary_loss` as a Pyro model (observed site ``"y_aux"``,
        scaled by alpha) for ``SVI(ssvae.model_classify, ssvae.guide_classify,
        optim, Trace_ELBO())``, whose loss is then exactly that term."""
        params.module(self, "ssvae")
        x = self.check_data(x, y)
        with pyro.plate("data", x.shape[0]), pyro.poutine.scale(scale=self.aux_weight):
            pyro.sample("y_aux", dist.Categorical(logits=self.classifier(x)), obs=y)

    def guide_classify(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The empty guide of :meth:`model_classify` (it has no latent)."""

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """argmax_y q_phi(y|x), shape ``(B,)``."""
        return self.classifier(self.check_data(x)).argmax(-1)

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The share of examples whose :meth:`classify` is their label y."""
        return (self.classify(x) == y.to(x.device)).double().mean().item()


def pack_labels(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[x, y]``: the batch ``x (B, D)`` with its labels ``y (B,)`` as a last
    column (-1 where unlabelled), one tensor for a loop that moves batches."""
    return torch.cat([x, y.to(x.dtype)[:, None]], 1)


def unpack_labels(batch: torch.Tensor) -> tuple:
    """``(x, y)`` from :func:`pack_labels`'s ``[x, y]``, y as integers."""
    return batch[:, :-1], batch[:, -1].round().long()


class SemiSupervisedLoss:
    """M2's training loss on a batch of labelled and unlabelled examples,

        loss = -sum_{x unlabelled} U(x) - sum_{(x, y) labelled} [L(x, y) + alpha log q_phi(y|x)],

    U and L by ``elbo`` (default :class:`~pyrovae.infer.TraceAnalyticKL_ELBO`,
    y summed exactly), the last term :meth:`SSVAE.auxiliary_loss`. With the
    classification term it is not a bound: the trainer logs it as
    ``train_loss`` (:attr:`train_metric`), never as an ELBO."""

    train_metric = "train_loss"

    def __init__(self, elbo=None):
        self.elbo = elbo if elbo is not None else TraceAnalyticKL_ELBO(max_plate_nesting=1)

    def differentiable_loss(self, model, guide, batch: torch.Tensor) -> torch.Tensor:
        """The loss of ``batch = pack_labels(x, y)`` (y = -1 unlabelled) for an
        :class:`SSVAE`'s ``model`` and ``guide`` (its bound methods)."""
        m2 = getattr(model, "__self__", None)
        if not isinstance(m2, SSVAE):
            raise TypeError(f"model must be an SSVAE's model method, got {model!r}")
        x, y = unpack_labels(batch)
        labelled = y >= 0
        loss = 0.0
        if not bool(labelled.all()):
            loss = loss + self.elbo.differentiable_loss(model, guide, x[~labelled])
        if bool(labelled.any()):
            x_l, y_l = x[labelled], y[labelled]
            loss = loss + self.elbo.differentiable_loss(model, guide, x_l, y_l) + m2.auxiliary_loss(x_l, y_l)
        return loss
