"""How ``pyrovae train hvae`` builds, feeds, evaluates and draws a hierarchical
VAE (its recipe for the shared loop in :mod:`pyrovae.train`). Data, binarisation,
KL warm-up and figures are the VAE's (:class:`~pyrovae.recipes.vae.VAERecipe`);
the model and its per-layer report are the hierarchy's."""

from __future__ import annotations

import torch

from pyrovae import data as datasets
from pyrovae.hvae import HVAE, active_units, bound_terms, build_hvae, check_prior
from pyrovae.infer import evaluate_iwae, make_elbo
from pyrovae.recipes.vae import VAERecipe


class HVAERecipe(VAERecipe):
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
            ds.x_dim, tuple(cfg.z_dims), hidden, encoder=cfg.encoder, prior=cfg.prior, likelihood=cfg.likelihood
        )

    @staticmethod
    def net(cfg) -> str:
        return "mlp"

    @torch.no_grad()
    def evaluate(self, cfg, hvae: HVAE, x_test: torch.Tensor, batch_size: int = 500) -> dict:
        """The VAE's report (``test_recon``, ``test_kl_top`` = kl_L, ``test_elbo``,
        ``test_bpd``, IWAE-k with ``cfg.iwae_k > 0``) and the hierarchy's, per
        image in nats: ``test_kl_layers`` (= kl_1 + .. + kl_{L-1}, so that elbo =
        recon - kl_top - kl_layers), ``test_kl_1`` .. ``test_kl_L`` (layer L is
        the top) and ``test_active_1`` .. ``test_active_L``, the active units
        per layer (:func:`~pyrovae.hvae.active_units`)."""
        terms = bound_terms(hvae, x_test, cfg.test_particles, batch_size)
        terms.pop("closed_form")
        metrics = {f"test_{name}": value for name, value in terms.items()}
        metrics.update({f"test_active_{l}": float(n) for l, n in active_units(hvae, x_test).items()})
        if cfg.iwae_k > 0:
            iwae = evaluate_iwae(hvae.model, hvae.guide, x_test, cfg.iwae_k)
            metrics.update(test_iwae=iwae["iwae"], test_iwae_bpd=iwae["iwae_bpd"])
        return metrics
