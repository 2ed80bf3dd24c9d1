"""How ``pyrovae train hvae`` builds, feeds, evaluates and draws a hierarchical
VAE (its recipe for the shared loop in :mod:`pyrovae.train`). Data, binarisation,
KL warm-up and figures are the VAE's (:class:`~pyrovae.recipes.vae.VAERecipe`);
the model and its per-layer report are the hierarchy's."""

from __future__ import annotations

from pyrovae import data as datasets
from pyrovae.hvae import HVAE, build_hvae, check_prior
from pyrovae.infer import make_elbo
from pyrovae.recipes.conditional import num_classes
from pyrovae.recipes.vae import VAERecipe


class HVAERecipe(VAERecipe):
    per_layer = True  # test_kl_1 .. test_kl_L and test_active_1 .. test_active_L

    def check(self, cfg) -> None:
        """Raise ``ValueError`` for HVAE settings that cannot work (the field
        choices and bounds are checked by the config)."""
        if len(cfg.hidden) not in (1, len(cfg.z_dims)):
            raise ValueError(
                f"hidden must give one width per layer ({len(cfg.z_dims)}, as z_dims) or one for all, got {cfg.hidden}"
            )
        if cfg.kl_warmup and not hasattr(make_elbo(cfg.elbo), "kl_scale"):
            raise ValueError(
                f"kl_warmup needs an ELBO with a kl_scale (--elbo analytic), got elbo {cfg.elbo!r}; "
                f"the HVAE warms up by default (kl_warmup = {cfg.kl_warmup}): add --kl-warmup 0 to train with {cfg.elbo!r}"
            )
        check_prior(cfg.prior, cfg.encoder, len(cfg.z_dims))

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
