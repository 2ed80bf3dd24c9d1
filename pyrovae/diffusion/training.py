"""How ``pyrovae train diffusion`` builds, feeds, evaluates and draws a
diffusion chain (its recipe for the shared loop in :mod:`pyrovae.train`), and
how ``pyrovae sample|evaluate diffusion`` load a finished run."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import torch

from pyrovae import data as datasets
from pyrovae import plots
from pyrovae.diffusion.chain import DECODERS, PARAMETERIZATIONS, VARIANCES, DiffusionChain
from pyrovae.diffusion.denoisers import TimeMLP, UNet
from pyrovae.diffusion.schedule import SCHEDULES, NoiseSchedule
from pyrovae.infer.diffusion_elbo import OBJECTIVES, TIME_SAMPLERS, DiffusionELBO

NETS = ("auto", "mlp", "unet")
CONTINUOUS_DATA = ("moons",)  # every other dataset is 8-bit images
TERMS_EXAMPLES = 8  # test examples whose full bound is drawn term by term after training


def to_chain_space(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 1] -> the 256 bin centres of [-1, 1]: x is quantised to 8 bits
    (round(255 x), exact for MNIST; for the 17-level digits it maps k/16 to the
    nearest 8-bit level), then scaled as DDPM does, x0 = 2 x8 / 255 - 1."""
    return (x * 255).round() / 127.5 - 1


def from_chain_space(x0: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1] for plotting."""
    return ((x0 + 1) / 2).clamp(0, 1)


class DiffusionRecipe:
    elbo_unit = "ELBO (nats per example)"

    def check(self, cfg) -> None:
        """Raise ``ValueError`` for diffusion settings that cannot work."""
        if isinstance(cfg.T, bool) or not isinstance(cfg.T, int) or cfg.T < 1:
            raise ValueError(f"T must be an integer >= 1, got {cfg.T!r}")
        for name, allowed in (("schedule", SCHEDULES), ("net", NETS), ("objective", OBJECTIVES), ("parameterization", PARAMETERIZATIONS), ("variance", VARIANCES), ("time_sampler", TIME_SAMPLERS)):
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(cfg, name)!r}; expected one of {', '.join(allowed)}")
        if cfg.objective == "hybrid" and cfg.variance != "learned":
            raise ValueError(f"objective 'hybrid' trains learned variances; set variance 'learned' (got {cfg.variance!r})")
        if cfg.objective == "simple" and cfg.variance == "learned":
            raise ValueError("objective 'simple' gives learned variances no gradient; use 'elbo' or 'hybrid'")
        if cfg.objective == "simple" and cfg.time_sampler == "importance":
            raise ValueError("time_sampler 'importance' weights the bound's terms; objective 'simple' has none")
        if cfg.channels < 1 or cfg.sample_steps < 1 or any(h < 1 for h in cfg.hidden):
            raise ValueError(f"channels, sample_steps and hidden sizes must be >= 1, got {cfg.channels}, {cfg.sample_steps}, {cfg.hidden}")

    def build(self, cfg, ds: datasets.Dataset) -> DiffusionChain:
        out_mult = 2 if cfg.variance == "learned" else 1
        net = cfg.net if cfg.net != "auto" else ("unet" if ds.is_image else "mlp")
        if net == "unet":
            if not ds.is_image:
                raise ValueError(f"net 'unet' needs image data; {ds.name!r} has examples of shape {ds.image_shape}")
            denoiser = UNet(ds.image_shape, cfg.channels, out_mult=out_mult)
        else:
            denoiser = TimeMLP(ds.x_dim, cfg.hidden, out_mult=out_mult)
        decoder = DECODERS[0] if ds.is_image else DECODERS[1]
        return DiffusionChain(denoiser, NoiseSchedule.from_name(cfg.schedule, cfg.T), ds.x_dim, decoder, cfg.parameterization, cfg.variance)

    def objective(self, cfg) -> DiffusionELBO:
        return DiffusionELBO(objective=cfg.objective, time_sampler=cfg.time_sampler)

    def prepare_batch(self, cfg, x: torch.Tensor) -> torch.Tensor:
        return x if cfg.data in CONTINUOUS_DATA else to_chain_space(x)

    def prepare_test(self, cfg, x: torch.Tensor) -> torch.Tensor:
        return self.prepare_batch(cfg, x)

    @torch.no_grad()
    def evaluate(self, cfg, chain: DiffusionChain, x_test: torch.Tensor, batch_size: int = 500) -> dict:
        """The test ELBO in nats per example (and bits/dim for images), estimated
        without bias by :class:`DiffusionELBO` with ``cfg.test_particles`` draws of
        t per example: cheap enough for every epoch whatever T. The exact full-T
        bound is ``pyrovae evaluate diffusion``."""
        elbo = DiffusionELBO(num_particles=cfg.test_particles)
        total = 0.0
        for i in range(0, len(x_test), batch_size):
            total -= elbo.loss(chain.model, chain.guide_posterior, x_test[i : i + batch_size])
        row = {"test_elbo": total / len(x_test)}
        if chain.decoder == "discretised":
            row["test_bpd"] = -row["test_elbo"] / (chain.x_dim * math.log(2))
        return row

    def write_figures(self, out: str, cfg, chain: DiffusionChain, ds: datasets.Dataset, x_test: torch.Tensor) -> None:
        write_samples(os.path.join(out, "samples.png"), chain, ds, min(cfg.sample_steps, chain.T), x_test)
        with torch.no_grad():
            bound = chain.full_bound(x_test[:TERMS_EXAMPLES])
        plots.plot_bound_terms(os.path.join(out, "terms.png"), bound["prior"].mean().item(), bound["terms"].mean(0).tolist(), f"bound terms, {min(len(x_test), TERMS_EXAMPLES)} test examples")


def write_samples(path: str, chain: DiffusionChain, ds: datasets.Dataset, steps: int, x_test: torch.Tensor, n: int | None = None) -> None:
    """A grid of ``n`` (default 64) samples for images, or a scatter of ``n``
    (default 2,000) samples over the test data for 2-D data, drawn with the
    chain respaced to ``steps`` steps."""
    title = f"samples, {steps} of {chain.T} steps"
    if ds.is_image:
        images = from_chain_space(chain.sample(n or 64, steps=steps))
        plots.save_image_grid(path, images, ds.image_shape, min(8, len(images)), title)
    else:
        points = chain.sample(n or 2000, steps=steps)
        plots.save_scatter(path, torch.cat([x_test, points]), title, torch.cat([torch.zeros(len(x_test)), torch.ones(len(points))]))


def load_run(run_dir: str, device: str = "cpu"):
    """``(chain, cfg, ds)`` from a finished run's ``config.json`` and ``model.pt``."""
    from pyrovae.train import TrainConfig

    paths = {name: os.path.join(run_dir, name) for name in ("config.json", "model.pt")}
    for name, path in paths.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: is {run_dir!r} a finished `pyrovae train diffusion` run?")
    with open(paths["config.json"]) as f:
        saved = json.load(f)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in names})
    if cfg.model != "diffusion":
        raise ValueError(f"{run_dir!r} holds a {cfg.model!r} run, not a diffusion run")
    ds = datasets.load_dataset(cfg.data, cfg.data_dir).subset(None, cfg.test_size).to(device)
    chain = DiffusionRecipe().build(cfg, ds)
    chain.load_state_dict(torch.load(paths["model.pt"], map_location=device))
    return chain.to(device).eval(), cfg, ds
