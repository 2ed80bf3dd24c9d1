"""The parts every latent-variable model here is built from.

- priors: modules ``() -> p(z)`` (event shape ``(z_dim,)``), the top of every
  hierarchy (the VAE's p(z), the hierarchical VAE's p(z_L), the chain's p(x_T));
- likelihoods: modules ``decoder output -> p_theta(x | first latent)``;
- encoders: modules ``x -> q_phi(z | x)``;
- kl: the closed-form KLs the analytic ELBO uses where they are registered.
"""

from pyrovae.parts import kl  # noqa: F401  (registers the Gaussian-vs-diagonal-Normal KLs)
from pyrovae.parts.encoders import GUIDES, DiagonalNormalEncoder, FullNormalEncoder, IAFEncoder, LowRankNormalEncoder
from pyrovae.parts.likelihoods import (
    LIKELIHOODS,
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    DiscretisedGaussianLikelihood,
    DiscretisedLogisticLikelihood,
    GaussianLikelihood,
)
from pyrovae.parts.priors import PRIORS, FlowPrior, MixtureOfGaussiansPrior, StandardNormalPrior, VampPrior

__all__ = [
    "PRIORS",
    "GUIDES",
    "LIKELIHOODS",
    "StandardNormalPrior",
    "MixtureOfGaussiansPrior",
    "VampPrior",
    "FlowPrior",
    "DiagonalNormalEncoder",
    "LowRankNormalEncoder",
    "FullNormalEncoder",
    "IAFEncoder",
    "BernoulliLikelihood",
    "ContinuousBernoulliLikelihood",
    "GaussianLikelihood",
    "DiscretisedLogisticLikelihood",
    "DiscretisedGaussianLikelihood",
]
