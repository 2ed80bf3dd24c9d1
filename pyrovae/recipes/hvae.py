"""How ``pyrovae train hvae`` builds, feeds, evaluates and draws a hierarchical
VAE (its recipe for the shared loop in :mod:`pyrovae.train`). Data, binarisation,
KL warm-up and figures are the VAE's (:class:`~pyrovae.recipes.vae.VAERecipe`);
the model and its per-layer report are the hierarchy's."""

from __future__ import annotations

from dataclasses import dataclass

from pyrovae import data as datasets
from pyrovae.config import TrainConfig, option, override
from pyrovae.hvae import ENCODERS, HVAE, build_hvae, check_prior
from pyrovae.infer.elbos import ELBOS
from pyrovae.parts.likelihoods import LIKELIHOODS
from pyrovae.parts.priors import PRIORS
from pyrovae.recipes.conditional import num_classes
from pyrovae.recipes.vae import VAERecipe, check_kl_warmup


@dataclass
class HVAEConfig(TrainConfig):
    """``pyrovae train hvae``: a hierarchical VAE (L layers of latents) by SVI; by default the VAE with a
    second latent layer on top, bottom-up, with a 50-epoch KL warm-up: the best shape and recipe measured
    here (docs/hvae.md)"""

    model: str = override("model", "hvae")
    binarize: str = option(
        "dynamic", "binarisation of pixel values for the Bernoulli likelihood", choices=datasets.BINARIZE
    )
    z_dims: list[int] = option([50, 20], "latent sizes z_1 (next to the data) .. z_L (the top)", ge=1)
    hidden: list[int] = option(
        [400, 200], "hidden width of each layer's networks (one per layer, or one for all)", ge=1
    )
    depth: int = option(1, "hidden layers of that width in each layer's networks", ge=1)
    encoder: str = option(
        "bottom-up",
        "q(z|x): bottom-up (IWAE paper; Monte Carlo KL below the top) or top-down (Ladder VAE, every KL exact)",
        choices=ENCODERS,
    )
    elbo: str = option("analytic", "ELBO estimator", choices=ELBOS)
    kl_warmup: int = option(
        50,
        "KL weight rises linearly from 0 to 1 over this many epochs (0: no warm-up; the default 50 gave "
        "+1.35 nats IWAE-1000 on MNIST-5k, docs/hvae.md)",
        ge=0,
    )
    prior: str = option(
        "normal",
        "prior p(z_L) of the top layer (vamp needs the top-down encoder; conditional: p(z_L | y), --conditional)",
        choices=PRIORS,
    )
    likelihood: str = option("bernoulli", "p(x|z_1); only bernoulli binarises the data", choices=LIKELIHOODS)
    iwae_k: int = option(0, "IWAE-k log-likelihood on the test split after each evaluation (0: off)", ge=0)


class HVAERecipe(VAERecipe):
    per_layer = True  # test_kl_1 .. test_kl_L and test_active_1 .. test_active_L

    def check(self, cfg) -> None:
        """Raise ``ValueError`` for HVAE settings that cannot work (the field
        choices and bounds are checked by the config)."""
        if len(cfg.hidden) not in (1, len(cfg.z_dims)):
            raise ValueError(
                f"hidden must give one width per layer ({len(cfg.z_dims)}, as z_dims) or one for all, got {cfg.hidden}"
            )
        check_kl_warmup(cfg)
        check_prior(cfg.prior, cfg.encoder, len(cfg.z_dims), getattr(cfg, "conditional", False))

    def build(self, cfg, ds: datasets.Dataset) -> HVAE:
        hidden = [(width,) * cfg.depth for width in cfg.hidden]
        return build_hvae(
            ds.x_dim,
            tuple(cfg.z_dims),
            hidden,
            encoder=cfg.encoder,
            prior=cfg.prior,
            likelihood=cfg.likelihood,
            num_classes=num_classes(cfg, ds),
        )

    @staticmethod
    def net(cfg) -> str:
        return "mlp"
