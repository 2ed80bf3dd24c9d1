"""How ``pyrovae train hvae`` builds, feeds, evaluates and draws a hierarchical
VAE (its recipe for the shared loop in :mod:`pyrovae.train`). Data, binarisation,
KL warm-up and figures are the VAE's (:class:`~pyrovae.recipes.vae.VAERecipe`);
the model and its per-layer report are the hierarchy's."""

from __future__ import annotations

from pyrovae import data as datasets
from pyrovae.hvae import HVAE, build_hvae, check_prior
from pyrovae.recipes.vae import VAERecipe, check_kl_warmup


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
        check_prior(cfg.prior, cfg.encoder, len(cfg.z_dims))

    def build(self, cfg, ds: datasets.Dataset) -> HVAE:
        hidden = [(width,) * cfg.depth for width in cfg.hidden]
        return build_hvae(
            ds.x_dim, tuple(cfg.z_dims), hidden, encoder=cfg.encoder, prior=cfg.prior, likelihood=cfg.likelihood
        )

    @staticmethod
    def net(cfg) -> str:
        return "mlp"
