"""The VAE: prior p(z), decoder p_theta(x|z), encoder q_phi(z|x)."""

from pyrovae.vae.encoders import DiagonalNormalEncoder
from pyrovae.vae.likelihoods import BernoulliLikelihood
from pyrovae.vae.model import VAE, build_vae
from pyrovae.vae.priors import StandardNormalPrior

__all__ = ["VAE", "build_vae", "StandardNormalPrior", "DiagonalNormalEncoder", "BernoulliLikelihood"]
