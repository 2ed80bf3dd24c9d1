"""How ``pyrovae train vae`` builds, feeds, evaluates and draws a VAE (its recipe
for the shared loop in :mod:`pyrovae.train`)."""

from __future__ import annotations

import os

import torch

from pyrovae import data as datasets
from pyrovae import plots
from pyrovae.infer import make_elbo
from pyrovae.vae.model import VAE, build_vae


class VAERecipe:
    elbo_unit = "ELBO (nats per image)"

    def check(self, cfg) -> None:
        """Raise ``ValueError`` for VAE settings that cannot work."""
        if cfg.z_dim < 1:
            raise ValueError(f"z_dim must be >= 1, got {cfg.z_dim}")
        if any(h < 1 for h in cfg.hidden):
            raise ValueError(f"hidden sizes must be >= 1, got {cfg.hidden}")
        if cfg.binarize not in datasets.BINARIZE:
            raise ValueError(f"unknown binarize mode {cfg.binarize!r}; expected one of {', '.join(datasets.BINARIZE)}")
        make_elbo(cfg.elbo)

    def build(self, cfg, ds: datasets.Dataset) -> VAE:
        return build_vae(ds.x_dim, cfg.z_dim, tuple(cfg.hidden))

    def objective(self, cfg):
        return make_elbo(cfg.elbo)

    def on_epoch_start(self, cfg, epoch: int, objective) -> None:
        """Called by the loop before each epoch (e.g. to anneal the objective); nothing for the plain VAE."""

    def prepare_batch(self, cfg, x: torch.Tensor) -> torch.Tensor:
        return datasets.binarize(x, cfg.binarize)

    def prepare_test(self, cfg, x: torch.Tensor) -> torch.Tensor:
        return datasets.binarize_test(x, cfg.binarize)

    @torch.no_grad()
    def evaluate(self, cfg, vae: VAE, x_test: torch.Tensor, batch_size: int = 500) -> dict:
        """Test ELBO in nats per image, each image's ELBO averaged over
        ``cfg.test_particles`` draws of z (vectorised)."""
        elbo = make_elbo(cfg.elbo, num_particles=cfg.test_particles, vectorize_particles=True, max_plate_nesting=1)
        total = 0.0
        for i in range(0, len(x_test), batch_size):
            total -= elbo.loss(vae.model, vae.guide, x_test[i : i + batch_size])
        return {"test_elbo": total / len(x_test)}

    def write_figures(self, out: str, cfg, vae: VAE, ds: datasets.Dataset, x_test: torch.Tensor) -> None:
        if not ds.is_image:
            return
        plots.save_image_grid(os.path.join(out, "samples.png"), vae.sample(64), ds.image_shape, 8, "samples E[x|z], z ~ p(z)")
        x = x_test[:32]
        pairs = torch.stack([x, vae.reconstruct(x)], 1).reshape(64, -1)
        plots.save_image_grid(os.path.join(out, "reconstructions.png"), pairs, ds.image_shape, 8, "test image | reconstruction")
