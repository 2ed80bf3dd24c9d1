"""Diffusion as a hierarchical VAE: the noise schedule (the fixed encoder's
numbers), the denoisers, and the chain as a Pyro model/guide pair."""

from pyrovae.diffusion.chain import DiffusionChain
from pyrovae.diffusion.denoisers import TimeMLP, UNet
from pyrovae.diffusion.schedule import SCHEDULES, NoiseSchedule, cosine_betas, linear_betas

__all__ = ["SCHEDULES", "DiffusionChain", "NoiseSchedule", "TimeMLP", "UNet", "cosine_betas", "linear_betas"]
