"""Priors p(z): modules whose ``forward()`` returns a Pyro distribution with
``batch_shape == ()`` and ``event_shape == (z_dim,)``; a conditional prior
p(z | y) (``conditional = True``) takes y's features, ``forward(c)``, and has
batch shape ``(B,)``.

Any ``nn.Module`` with that contract can be passed to :class:`~pyrovae.vae.VAE`;
parameters it owns are trained with the rest of the model. :data:`PRIORS` names
the ones that ship, for ``build_vae(prior="vamp")`` and ``--prior vamp``.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import AffineAutoregressive, Permute, SplineCoupling
from pyro.nn import AutoRegressiveNN, DenseNN
from torch import nn
from torch.nn.functional import softplus

from pyrovae.parts.encoders import MIN_SCALE
from pyrovae.registry import lookup


class StandardNormal(dist.Normal):
    """N(0, 1) elementwise: a ``Normal`` whose loc is 0 and scale 1 (the caller
    passes those tensors, on its device and dtype). It is a class of its own
    for its closed-form KL from a Normal q (:mod:`pyrovae.parts.kl`),

        KL(N(mu, sigma^2) || N(0, 1)) = (mu^2 + sigma^2 - 1) / 2 - log sigma,

    :func:`~pyrovae.parts.kl.normal_kl` with p's unit variance left out: no
    division by p's scale, no subtraction of p's loc in every VAE step."""


class StandardNormalPrior(nn.Module):
    """p(z) = N(z; 0, I). Its loc and scale are buffers (zeros and ones), so
    ``.to(device)`` moves them and checkpoints hold them; they are constants,
    and a state dict with other values is refused (the prior's KL assumes them)."""

    def __init__(self, z_dim: int):
        super().__init__()
        if z_dim < 1:
            raise ValueError(f"z_dim must be >= 1, got {z_dim}")
        self.z_dim = z_dim
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checked before anything is copied: a refused state dict leaves the prior as it was
        loc, scale = state_dict.get(prefix + "loc"), state_dict.get(prefix + "scale")
        if (loc is not None and not bool((loc == 0).all())) or (scale is not None and not bool((scale == 1).all())):
            raise ValueError(
                "a StandardNormalPrior's loc and scale are 0 and 1; "
                f"the state dict holds other values at {prefix}loc/{prefix}scale "
                "(a prior with a learned or shifted location is another prior: pyrovae.parts.priors.PRIORS)"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self) -> dist.Distribution:
        return StandardNormal(self.loc, self.scale).to_event(1)


class Mixture(dist.TorchDistribution):
    """p(z) = sum_k pi_k p_k(z): a finite mixture of the ``K`` components that
    ``components`` holds along its rightmost batch dimension.

    Unlike ``MixtureSameFamily``, :meth:`log_prob` expands ``z`` to every
    component explicitly (``(..., K, z_dim)``) instead of relying on
    broadcasting, so components whose ``log_prob`` cannot broadcast (a
    flow conditioned on a context of batch ``(K,)``, as in a VampPrior built on
    an IAF encoder) work too.

    :param logits: unnormalised log pi, shape ``batch_shape + (K,)``.
    :param components: distribution with ``batch_shape + (K,)`` batch shape and
        event shape ``(z_dim,)``.
    """

    arg_constraints = {"logits": constraints.real_vector}
    has_rsample = False

    def __init__(self, logits: torch.Tensor, components: dist.Distribution, validate_args=None):
        if components.batch_shape[-1:] != logits.shape[-1:] or len(components.event_shape) != 1:
            raise ValueError(
                f"components must have batch shape (..., K={logits.shape[-1]}) and one event dim, "
                f"got batch {tuple(components.batch_shape)} event {tuple(components.event_shape)}"
            )
        self.logits = logits
        self.components = components
        super().__init__(logits.shape[:-1], components.event_shape, validate_args=validate_args)

    @constraints.dependent_property
    def support(self):
        return self.components.support

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        k = self.logits.shape[-1:]
        return Mixture(self.logits.expand(batch_shape + k), self.components.expand(batch_shape + k))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        k = self.logits.shape[-1]
        z_k = z.unsqueeze(-2).expand(*z.shape[:-1], k, z.shape[-1])
        return torch.logsumexp(self.logits.log_softmax(-1) + self.components.log_prob(z_k), dim=-1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            which = dist.Categorical(logits=self.logits).sample(sample_shape)
            draws = self.components.sample(sample_shape)  # (..., K, z_dim)
            index = which[..., None, None].expand(*which.shape, 1, draws.shape[-1])
            return draws.gather(-2, index).squeeze(-2)


class MixtureOfGaussiansPrior(nn.Module):
    """p(z) = sum_k pi_k N(z; mu_k, diag(sigma_k^2)), with pi, mu_k and sigma_k learned.

    The means start as draws from N(0, I) so that the components differ from
    the first step; the scales start at 1.
    """

    def __init__(self, z_dim: int, num_components: int = 10):
        super().__init__()
        if z_dim < 1:
            raise ValueError(f"z_dim must be >= 1, got {z_dim}")
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        self.z_dim = z_dim
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.locs = nn.Parameter(torch.randn(num_components, z_dim))
        # softplus(raw) = 1 at raw = log(e - 1)
        self.raw_scales = nn.Parameter(torch.full((num_components, z_dim), math.log(math.e - 1)))

    def forward(self) -> dist.Distribution:
        components = dist.Normal(self.locs, softplus(self.raw_scales) + MIN_SCALE).to_event(1)
        return Mixture(self.logits, components)


class VampPrior(nn.Module):
    """The VampPrior (Tomczak & Welling, 2018): p(z) = (1/K) sum_k q_phi(z | u_k),
    a uniform mixture of the encoder's own posteriors at K learned pseudo-inputs u_k.

    :param encoder: the VAE's encoder (shared, not copied: the prior follows
        the encoder as it trains); it must have an ``x_dim`` attribute.
    :param num_pseudo: K.
    :param bounds: the data range; pseudo-inputs are clamped to it as in the
        paper (``None`` for unbounded data).
    :param init_mean, init_std: pseudo-inputs start as N(init_mean, init_std^2)
        draws (the paper's 0.05 and 0.01 for MNIST).
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_pseudo: int = 100,
        bounds=(0.0, 1.0),
        init_mean: float = 0.05,
        init_std: float = 0.01,
    ):
        super().__init__()
        if num_pseudo < 1:
            raise ValueError(f"num_pseudo must be >= 1, got {num_pseudo}")
        if not hasattr(encoder, "x_dim"):
            raise TypeError(f"encoder must have an x_dim attribute, got {type(encoder).__name__}")
        # a plain attribute list keeps the encoder's parameters registered once, under the VAE's encoder
        self._encoder = [encoder]
        self.bounds = bounds
        self.pseudo_inputs = nn.Parameter(init_mean + init_std * torch.randn(num_pseudo, encoder.x_dim))

    @property
    def encoder(self) -> nn.Module:
        return self._encoder[0]

    def forward(self) -> dist.Distribution:
        u = self.pseudo_inputs if self.bounds is None else self.pseudo_inputs.clamp(*self.bounds)
        components = self.encoder(u)
        return Mixture(torch.zeros(u.shape[0], device=u.device), components)


FLOWS = ("affine_autoregressive", "spline_coupling")


class FlowPrior(nn.Module):
    """p(z) = N(eps; 0, I) ``|det d eps/dz|`` with eps = f(z), f a stack of Pyro
    transforms: a learned density that can be multimodal and skewed.

    ``affine_autoregressive`` is used in the masked-autoregressive direction
    (Papamakarios et al. 2017): eps = f(z) is one network pass, so log p(z) on
    the guide's z is cheap, and sampling is the sequential direction.
    ``spline_coupling`` (Durkan et al. 2019) is cheap both ways (needs
    ``z_dim >= 2``). Layers are separated by a fixed permutation (held as a
    buffer so that ``.to(device)`` moves it).
    """

    def __init__(self, z_dim: int, num_flows: int = 2, flow: str = "affine_autoregressive", hidden: int | None = None):
        super().__init__()
        if z_dim < 1:
            raise ValueError(f"z_dim must be >= 1, got {z_dim}")
        if num_flows < 1:
            raise ValueError(f"num_flows must be >= 1, got {num_flows}")
        lookup("flow", flow, FLOWS)
        if flow == "spline_coupling" and z_dim < 2:
            raise ValueError(f"spline_coupling needs z_dim >= 2, got {z_dim}")
        self.z_dim, self.flow = z_dim, flow
        hidden = hidden or 3 * z_dim + 1
        split = z_dim // 2
        layers = []
        for _ in range(num_flows):
            if flow == "affine_autoregressive":
                layers.append(AffineAutoregressive(AutoRegressiveNN(z_dim, [hidden])))
            else:
                n = z_dim - split
                net = DenseNN(split, [hidden, hidden], param_dims=[n * 8, n * 8, n * 7, n * 8])
                layers.append(SplineCoupling(z_dim, split, net, count_bins=8, bound=3.0))
        self.layers = nn.ModuleList(layers)
        self.register_buffer("loc", torch.zeros(z_dim))
        self.register_buffer("scale", torch.ones(z_dim))
        self.register_buffer("permutation", torch.randperm(z_dim))

    def forward(self) -> dist.Distribution:
        transforms = []
        for i, layer in enumerate(self.layers):
            if i > 0:
                transforms.append(Permute(self.permutation))
            transforms.append(layer.inv if self.flow == "affine_autoregressive" else layer)
        return dist.TransformedDistribution(dist.Normal(self.loc, self.scale).to_event(1), transforms)


class ConditionalNormalPrior(nn.Module):
    """p_theta(z | y) = N(z; mu_theta(y), diag sigma_theta(y)^2): the learned
    conditional prior of a conditional VAE (Sohn, Lee & Yan 2015's prior
    network), at the top layer z_L of a conditional HVAE.

    ``forward(c)`` takes y's features ``c`` (``(B, c_dim)``: one-hot classes, or
    a float y flattened; :class:`pyrovae.nets.Conditioning`) and returns a
    distribution of batch shape ``(B,)``. mu and log sigma are linear in ``c``
    (for classes: a learned mean and scale per class), zero at initialisation,
    so that the model starts as the N(0, I) prior's. With the N(0, I) prior a
    draw of z may carry information about the class that contradicts the y it
    is decoded with; with this one z ~ p(z | y) lies where the encoder puts
    the examples of class y. Its KL to a diagonal Normal q(z | x, y) is still a
    closed form (the analytic ELBO takes it).
    """

    conditional = True

    def __init__(self, z_dim: int, c_dim: int):
        super().__init__()
        if z_dim < 1:
            raise ValueError(f"z_dim must be >= 1, got {z_dim}")
        if c_dim < 1:
            raise ValueError(f"p(z | y) needs y's features (c_dim >= 1: a conditional model), got c_dim {c_dim}")
        self.z_dim, self.c_dim = z_dim, c_dim
        self.net = nn.Linear(c_dim, 2 * z_dim, bias=False)
        nn.init.zeros_(self.net.weight)

    def forward(self, c: torch.Tensor) -> dist.Distribution:
        loc, log_scale = self.net(c.to(self.net.weight)).split(self.z_dim, -1)
        return dist.Normal(loc, log_scale.exp()).to_event(1)


PRIORS = {
    "normal": lambda z_dim, encoder, c_dim=0: StandardNormalPrior(z_dim),
    "mog": lambda z_dim, encoder, c_dim=0: MixtureOfGaussiansPrior(z_dim),
    "vamp": lambda z_dim, encoder, c_dim=0: VampPrior(encoder),
    "flow": lambda z_dim, encoder, c_dim=0: FlowPrior(z_dim),
    # without y (c_dim 0) it refuses itself; build_hvae's check_prior says so first, naming --conditional
    "conditional": lambda z_dim, encoder, c_dim=0: ConditionalNormalPrior(z_dim, c_dim),
}
"""Prior constructors by name, each ``(z_dim, encoder, c_dim=0) -> prior
module``; ``c_dim`` is the size of a conditional model's y features (0 for
none), which only ``conditional`` uses."""
