"""Diffusion as a hierarchical VAE: the noise schedule (the fixed encoder's
numbers), the denoisers, and the chain as a Pyro model/guide pair; in
continuous time, the gamma(t) schedules and the variational diffusion model;
the interface both models implement (:class:`DiffusionModel`)."""

from pyrovae.diffusion.base import DiffusionModel
from pyrovae.diffusion.chain import DiffusionChain
from pyrovae.diffusion.denoisers import TimeMLP, UNet
from pyrovae.diffusion.gamma import GammaSchedule, LinearGamma, MonotoneNetGamma, make_gamma
from pyrovae.diffusion.schedule import SCHEDULES, NoiseSchedule, cosine_betas, linear_betas
from pyrovae.diffusion.vdm import VDM

__all__ = [
    "SCHEDULES",
    "DiffusionModel",
    "DiffusionChain",
    "NoiseSchedule",
    "TimeMLP",
    "UNet",
    "cosine_betas",
    "linear_betas",
    "VDM",
    "GammaSchedule",
    "LinearGamma",
    "MonotoneNetGamma",
    "make_gamma",
]
