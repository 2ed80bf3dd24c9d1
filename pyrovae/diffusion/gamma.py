"""Noise schedules of continuous-time diffusion: gamma(t), t in [0, 1].

Variational diffusion models (Kingma, Salimans, Poole & Ho 2021) write the
forward process through one increasing function gamma,

    q(z_t | x) = N(alpha_t x, sigma_t^2 I),
    sigma_t^2 = sigmoid(gamma(t)),   alpha_t^2 = sigmoid(-gamma(t)),   SNR(t) = exp(-gamma(t)),

and the continuous-time bound weighs the denoising error by gamma'(t). Every
schedule here is written as its two end points and a normalised interior,

    gamma(t) = gamma_min + (gamma_max - gamma_min) * shape(t),
    shape: [0, 1] -> [0, 1] nondecreasing, shape(0) = 0, shape(1) = 1,

so gamma(0) = gamma_min and gamma(1) = gamma_max are parameters of their own
(VDM's network schedule drifts off its end points, google-research/vdm issue
#11; here it cannot), and gamma is monotone by construction: the width
gamma_max - gamma_min = exp(log_width) is positive and the shape is a
monotone function. The continuous-time bound depends on the schedule only
through its end points, so the interior (the shape's parameters) is free to
be trained for a low-variance estimate instead (:class:`~pyrovae.infer.vdm_elbo.VDMELBO`).

gamma'(t) comes from autograd (the gradient in t), never from finite
differences; it is differentiable in the schedule's parameters.

Times ``t`` are float tensors of any shape with values in [0, 1]; gamma and
gamma' have ``t``'s shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pyrovae.registry import lookup

GAMMA_MIN, GAMMA_MAX = -13.3, 5.0  # VDM's defaults (CIFAR-10), used here too


class GammaSchedule(nn.Module):
    """gamma(t) = gamma_min + exp(log_width) * shape(t); subclasses define ``shape``.

    :param gamma_min: gamma(0), the log noise-to-signal ratio at t = 0.
    :param gamma_max: gamma(1); must exceed ``gamma_min``.
    :param learn_ends: make gamma_min and log(gamma_max - gamma_min) trainable
        parameters (else fixed buffers).
    """

    def __init__(self, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX, learn_ends: bool = True):
        super().__init__()
        if not (math.isfinite(gamma_min) and math.isfinite(gamma_max)) or not gamma_max > gamma_min:
            raise ValueError(
                f"gamma_max must be finite and > gamma_min, got gamma_min={gamma_min}, gamma_max={gamma_max}"
            )
        ends = {"gamma_min": torch.tensor(float(gamma_min)), "log_width": torch.tensor(math.log(gamma_max - gamma_min))}
        for name, value in ends.items():
            if learn_ends:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    @property
    def gamma_max(self) -> torch.Tensor:
        return self.gamma_min + self.log_width.exp()

    def interior_parameters(self) -> list[nn.Parameter]:
        """The parameters of ``shape``: those that move gamma between its end
        points without moving the end points."""
        return [p for name, p in self.named_parameters() if name not in ("gamma_min", "log_width")]

    def shape(self, t: torch.Tensor) -> torch.Tensor:
        """The schedule's interior, rising from 0 at t = 0 to 1 at t = 1: each schedule class says how."""
        raise NotImplementedError(f"{type(self).__name__} must define shape(t), rising from 0 at t = 0 to 1 at t = 1")

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """gamma(t), ``t``'s shape."""
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise TypeError(
                f"t must be a float tensor of times in [0, 1], got {type(t).__name__} {getattr(t, 'dtype', '')}"
            )
        return self.gamma_min.to(t.dtype) + self.log_width.exp().to(t.dtype) * self.shape(t)

    def shape_and_derivative(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shape(t), shape'(t)). shape is elementwise in t, so the gradient of
        sum(shape(t)) with respect to t is the elementwise derivative; the graph
        is kept (``create_graph``) when gradients are on, so shape' is
        differentiable in the schedule's parameters. (Reverse mode, not
        ``torch.func.jvp``: on CPU the forward-mode transform costs ~50 ms a call.)"""
        outer = torch.is_grad_enabled()
        with torch.enable_grad():
            t_ = t.detach().requires_grad_()
            shape = self.shape(t_)
            (dshape,) = torch.autograd.grad(shape.sum(), t_, create_graph=outer)
        return (shape, dshape) if outer else (shape.detach(), dshape.detach())

    def gamma_and_derivative(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gamma(t), gamma'(t)) = (gamma_min + W shape(t), W shape'(t)), W = gamma_max - gamma_min."""
        shape, dshape = self.shape_and_derivative(t)
        width = self.log_width.exp().to(t.dtype)
        return self.gamma_min.to(t.dtype) + width * shape, width * dshape


class LinearGamma(GammaSchedule):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t: fixed
    (``learn_ends=False``) or with learned end points (VDM's
    ``learnable_scalar`` schedule, initialised at -13.3 and 5.0)."""

    def shape(self, t: torch.Tensor) -> torch.Tensor:
        return t


class MonotoneNetGamma(GammaSchedule):
    """VDM's monotone network, normalised between its learned end points::

        g(t)     = l_1(t) + l_3(phi(l_2(t))) / n,   phi(h) = 2 (sigmoid(h) - 1/2)
        shape(t) = (g(t) - g(0)) / (g(1) - g(0))

    with l_1: 1 -> 1, l_2: 1 -> n (on 2 (t - 1/2)), l_3: n -> 1 (no bias)
    linear layers whose weights are ``|w|`` (``DenseMonotone`` in VDM's code), so g
    is nondecreasing and so is the shape. At initialisation the shape is close
    to linear (l_1 dominates).

    :param features: n, the width of the sigmoid branch (VDM: 1024).
    """

    def __init__(
        self, gamma_min: float = GAMMA_MIN, gamma_max: float = GAMMA_MAX, features: int = 1024, learn_ends: bool = True
    ):
        super().__init__(gamma_min, gamma_max, learn_ends)
        if features < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        self.l1, self.l2, self.l3 = nn.Linear(1, 1), nn.Linear(1, features), nn.Linear(features, 1, bias=False)
        nn.init.constant_(self.l1.weight, 1.0)
        self.features = features

    def _g(self, t: torch.Tensor) -> torch.Tensor:
        x = t.reshape(-1, 1)
        linear = F.linear(x, self.l1.weight.abs().to(t.dtype), self.l1.bias.to(t.dtype))
        h = F.linear(2 * (x - 0.5), self.l2.weight.abs().to(t.dtype), self.l2.bias.to(t.dtype))
        branch = F.linear(2 * (torch.sigmoid(h) - 0.5), self.l3.weight.abs().to(t.dtype)) / self.features
        return (linear + branch).reshape(t.shape)

    def shape(self, t: torch.Tensor) -> torch.Tensor:
        ends = self._g(torch.tensor([0.0, 1.0], dtype=t.dtype, device=t.device))
        return (self._g(t) - ends[0]) / (ends[1] - ends[0])


SCHEDULES = {
    "fixed": lambda: LinearGamma(learn_ends=False),
    "learned-linear": lambda: LinearGamma(learn_ends=True),
    "learned-net": lambda: MonotoneNetGamma(learn_ends=True),
}


def make_gamma(name: str) -> GammaSchedule:
    """The schedule ``name`` (one of :data:`SCHEDULES`) at VDM's initial end points."""
    return lookup("gamma schedule", name, SCHEDULES)()
