"""pyrovae: VAEs and diffusion models as latent variable models trained by
maximising an ELBO, written as Pyro model/guide pairs."""

from pyrovae.checkpoint import load
from pyrovae.vae import VAE, build_vae

__version__ = "0.1.0"
__all__ = ["VAE", "build_vae", "load", "__version__"]
