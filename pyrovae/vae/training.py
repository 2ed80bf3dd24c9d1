"""How ``pyrovae train vae`` builds, feeds, evaluates and draws a VAE (its recipe
for the shared loop in :mod:`pyrovae.train`)."""

from __future__ import annotations

import json
import os

import pyro
import torch

from pyrovae import data as datasets
from pyrovae import plots
from pyrovae.device import resolve_device
from pyrovae.infer import evaluate_iwae, make_elbo
from pyrovae.vae.encoders import GUIDES
from pyrovae.vae.likelihoods import LIKELIHOODS
from pyrovae.vae.model import NETS, VAE, build_vae
from pyrovae.vae.priors import PRIORS


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
        for kind, name, registry in (("prior", cfg.prior, PRIORS), ("guide", cfg.guide, GUIDES), ("likelihood", cfg.likelihood, LIKELIHOODS), ("net", cfg.net, NETS)):
            if name not in registry:
                raise ValueError(f"unknown {kind} {name!r}; expected one of {', '.join(registry)}")
        if cfg.iwae_k < 0:
            raise ValueError(f"iwae_k must be >= 0 (0: no IWAE estimate), got {cfg.iwae_k}")

    def build(self, cfg, ds: datasets.Dataset) -> VAE:
        image_shape = ds.image_shape if ds.is_image else None
        return build_vae(ds.x_dim, cfg.z_dim, tuple(cfg.hidden), prior=cfg.prior, guide=cfg.guide, likelihood=cfg.likelihood, net=cfg.net, image_shape=image_shape)

    def objective(self, cfg):
        return make_elbo(cfg.elbo)

    @staticmethod
    def binarize_mode(cfg) -> str:
        """``cfg.binarize`` for a likelihood of binary data (Bernoulli); the grey
        levels as they are for the others (continuous Bernoulli, Gaussian, discretised)."""
        return cfg.binarize if LIKELIHOODS[cfg.likelihood].binary_data else "none"

    def prepare_batch(self, cfg, x: torch.Tensor) -> torch.Tensor:
        return datasets.binarize(x, self.binarize_mode(cfg))

    def prepare_test(self, cfg, x: torch.Tensor) -> torch.Tensor:
        return datasets.binarize_test(x, self.binarize_mode(cfg))

    @torch.no_grad()
    def evaluate(self, cfg, vae: VAE, x_test: torch.Tensor, batch_size: int = 500) -> dict:
        """Test ELBO in nats per image, each image's ELBO averaged over
        ``cfg.test_particles`` draws of z (vectorised); with ``cfg.iwae_k > 0``
        also the IWAE-k estimate of log p(x) (``test_iwae`` in nats per image,
        ``test_iwae_bpd`` in bits per dimension)."""
        elbo = make_elbo(cfg.elbo, num_particles=cfg.test_particles, vectorize_particles=True, max_plate_nesting=1)
        total = 0.0
        for i in range(0, len(x_test), batch_size):
            total -= elbo.loss(vae.model, vae.guide, x_test[i : i + batch_size])
        metrics = {"test_elbo": total / len(x_test)}
        if cfg.iwae_k > 0:
            iwae = evaluate_iwae(vae.model, vae.guide, x_test, cfg.iwae_k)
            metrics.update(test_iwae=iwae["iwae"], test_iwae_bpd=iwae["iwae_bpd"])
        return metrics

    def write_figures(self, out: str, cfg, vae: VAE, ds: datasets.Dataset, x_test: torch.Tensor) -> None:
        if not ds.is_image:
            return
        plots.save_image_grid(os.path.join(out, "samples.png"), vae.sample(64), ds.image_shape, 8, "samples E[x|z], z ~ p(z)")
        x = x_test[:32]
        pairs = torch.stack([x, vae.reconstruct(x)], 1).reshape(2 * len(x), -1)
        plots.save_image_grid(os.path.join(out, "reconstructions.png"), pairs, ds.image_shape, 8, "test image | reconstruction")


def evaluate_run(run_dir: str, iwae_k: int, device: str = "auto") -> dict:
    """Rebuild the VAE a ``pyrovae train vae`` run folder describes (``config.json``,
    ``model.pt``) and evaluate it on its test split: test ELBO and the IWAE-k
    estimate of log p(x) (what ``pyrovae evaluate vae RUN --iwae-k K`` prints)."""
    from pyrovae.train import TrainConfig

    for name in ("config.json", "model.pt"):
        if not os.path.exists(os.path.join(run_dir, name)):
            raise FileNotFoundError(f"run_dir {run_dir!r} has no {name}; expected a folder written by pyrovae train vae")
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = TrainConfig(**json.load(f))
    cfg.iwae_k, cfg.device = iwae_k, device
    cfg.check()
    recipe = VAERecipe()
    dev = resolve_device(device)
    ds = datasets.load_dataset(cfg.data, cfg.data_dir).subset(cfg.train_size, cfg.test_size).to(dev)
    vae = recipe.build(cfg, ds).to(dev)
    vae.load_state_dict(torch.load(os.path.join(run_dir, "model.pt"), map_location=dev))
    vae.eval()
    # stale parameters of the same names would otherwise shadow the loaded ones
    pyro.clear_param_store()
    pyro.set_rng_seed(cfg.seed)
    return recipe.evaluate(cfg, vae, recipe.prepare_test(cfg, ds.x_test))
