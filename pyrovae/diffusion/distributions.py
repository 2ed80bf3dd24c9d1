"""The image decoder's distribution: a Gaussian discretised to 256 pixel bins."""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions.utils import broadcast_all

BIN_HALF_WIDTH = 1.0 / 255.0


class DiscretisedGaussian(TorchDistribution):
    """p(x) for x on the 256 bin centres -1, -1 + 2/255, ..., 1 (8-bit pixels
    scaled to [-1, 1]), elementwise:

        p(x) = Phi((x + 1/255 - mu) / s) - Phi((x - 1/255 - mu) / s)

    with the bin below -1 + 1/255 extended to -inf and the bin above
    1 - 1/255 to +inf, so the 256 masses sum to 1 (Ho et al. 2020, eq. 13).
    A probability mass function, so an ELBO with it as p_theta(x_0|x_1) bounds
    the log-likelihood of the discrete data and converts to bits/dim.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.interval(-1.0, 1.0)
    has_rsample = False

    def __init__(self, loc, scale, validate_args=None):
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretisedGaussian, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.scale = self.loc.expand(batch_shape), self.scale.expand(batch_shape)
        super(DiscretisedGaussian, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        std_plus = (value + BIN_HALF_WIDTH - self.loc) / self.scale
        std_minus = (value - BIN_HALF_WIDTH - self.loc) / self.scale
        # Phi(b) - Phi(a) loses every digit when both lie far in the upper
        # tail; Phi(-a) - Phi(-b) is the same mass computed from the lower tail.
        upper = std_minus > 0
        mass = torch.where(
            upper,
            torch.special.ndtr(-std_minus) - torch.special.ndtr(-std_plus),
            torch.special.ndtr(std_plus) - torch.special.ndtr(std_minus),
        )
        log_mid = mass.clamp(min=torch.finfo(mass.dtype).tiny).log()
        edge = 1.0 - BIN_HALF_WIDTH
        return torch.where(
            value < -edge,
            torch.special.log_ndtr(std_plus),
            torch.where(value > edge, torch.special.log_ndtr(-std_minus), log_mid),
        )

    @property
    def mean(self):
        """The continuous Gaussian's mean clamped to [-1, 1] (what sample grids draw)."""
        return self.loc.clamp(-1.0, 1.0)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            y = self.loc.expand(shape) + self.scale.expand(shape) * torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
            return quantise(y)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """The nearest of the 256 bin centres of [-1, 1]."""
    return ((x.clamp(-1.0, 1.0) + 1) * 127.5).round() / 127.5 - 1
