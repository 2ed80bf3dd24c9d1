"""The VAE: prior p(z), decoder p_theta(x|z), encoder q_phi(z|x)."""

from pyrovae.vae import kl  # noqa: F401  (registers the Gaussian-vs-diagonal-Normal KLs)
from pyrovae.vae.encoders import GUIDES, DiagonalNormalEncoder, FullNormalEncoder, IAFEncoder, LowRankNormalEncoder
from pyrovae.vae.likelihoods import (
    LIKELIHOODS,
    BernoulliLikelihood,
    ContinuousBernoulliLikelihood,
    DiscretizedGaussianLikelihood,
    DiscretizedLogisticLikelihood,
    GaussianLikelihood,
)
from pyrovae.vae.model import NETS, VAE, build_vae
from pyrovae.vae.priors import PRIORS, FlowPrior, MixtureOfGaussiansPrior, StandardNormalPrior, VampPrior

__all__ = [
    "VAE",
    "build_vae",
    "PRIORS",
    "GUIDES",
    "LIKELIHOODS",
    "NETS",
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
    "DiscretizedLogisticLikelihood",
    "DiscretizedGaussianLikelihood",
]
