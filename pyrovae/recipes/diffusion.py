"""How ``pyrovae train diffusion`` builds, feeds, evaluates and draws a
diffusion chain (its recipe for the shared loop in :mod:`pyrovae.train`), and
how ``pyrovae sample|evaluate diffusion`` load a finished run."""

from __future__ import annotations

import json
import os

import torch

from pyrovae import data as datasets
from pyrovae import plots
from pyrovae.diffusion.chain import PARAMETERIZATIONS, VARIANCES, DiffusionChain
from pyrovae.diffusion.denoisers import TimeMLP, UNet
from pyrovae.diffusion.schedule import SCHEDULES, NoiseSchedule
from pyrovae.infer.bound import Bound, bound_terms, prefixed
from pyrovae.infer.diffusion_elbo import TIME_SAMPLERS, DiffusionELBO
from pyrovae.infer.losses import OBJECTIVES, make_objective
from pyrovae.recipes.conditional import num_classes

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
    def check(self, cfg) -> None:
        """Raise ``ValueError`` for diffusion settings that cannot work."""
        if isinstance(cfg.T, bool) or not isinstance(cfg.T, int) or cfg.T < 1:
            raise ValueError(f"T must be an integer >= 1, got {cfg.T!r}")
        for name, allowed in (
            ("schedule", SCHEDULES),
            ("net", NETS),
            ("objective", OBJECTIVES),
            ("parameterization", PARAMETERIZATIONS),
            ("variance", VARIANCES),
            ("time_sampler", TIME_SAMPLERS),
        ):
            if getattr(cfg, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(cfg, name)!r}; expected one of {', '.join(allowed)}")
        if cfg.objective == "hybrid" and cfg.variance != "learned":
            raise ValueError(
                f"objective 'hybrid' trains learned variances; set variance 'learned' (got {cfg.variance!r})"
            )
        if cfg.objective == "simple" and cfg.variance == "learned":
            raise ValueError("objective 'simple' gives learned variances no gradient; use 'elbo' or 'hybrid'")
        if cfg.objective == "simple" and cfg.time_sampler == "importance":
            raise ValueError("time_sampler 'importance' weights the bound's terms; objective 'simple' has none")
        if cfg.channels < 1 or cfg.sample_steps < 1 or any(h < 1 for h in cfg.hidden):
            raise ValueError(
                f"channels, sample_steps and hidden sizes must be >= 1, got {cfg.channels}, {cfg.sample_steps}, {cfg.hidden}"
            )

    def build(self, cfg, ds: datasets.Dataset) -> DiffusionChain:
        out_mult = 2 if cfg.variance == "learned" else 1
        net = cfg.net if cfg.net != "auto" else ("unet" if ds.is_image else "mlp")
        if net == "unet":
            if not ds.is_image:
                raise ValueError(f"net 'unet' needs image data; {ds.name!r} has examples of shape {ds.image_shape}")
            denoiser = UNet(ds.image_shape, cfg.channels, out_mult=out_mult, num_classes=num_classes(cfg, ds))
        else:
            denoiser = TimeMLP(ds.x_dim, cfg.hidden, out_mult=out_mult, num_classes=num_classes(cfg, ds))
        decoder = "discretised-gaussian" if ds.is_image else "gaussian"
        return DiffusionChain(
            denoiser,
            NoiseSchedule.from_name(cfg.schedule, cfg.T),
            ds.x_dim,
            decoder,
            cfg.parameterization,
            cfg.variance,
        )

    def objective(self, cfg):
        """The bound (:class:`DiffusionELBO`) or a loss that is not one
        (:mod:`pyrovae.infer.losses`); its ``train_metric`` names the training
        column, and its ``time_sampler`` (with a ``state_dict``) is the state
        a checkpoint keeps."""
        return make_objective(cfg.objective, time_sampler=cfg.time_sampler)

    def prepare_batch(self, cfg, x: torch.Tensor) -> torch.Tensor:
        return x if cfg.data in CONTINUOUS_DATA else to_chain_space(x)

    def prepare_test(self, cfg, x: torch.Tensor) -> torch.Tensor:
        return self.prepare_batch(cfg, x)

    @torch.no_grad()
    def evaluate(self, cfg, chain: DiffusionChain, x_test: torch.Tensor, batch_size: int = 500, y=None) -> dict:
        """The bound's named terms (:mod:`pyrovae.infer.bound`) per test example,
        in nats: ``test_recon``, ``test_kl_top``, ``test_kl_layers`` (the sum of
        the per-t KLs), ``test_elbo`` and, for images, ``test_bpd``; estimated
        without bias by :meth:`DiffusionELBO.terms` with ``cfg.test_particles``
        draws per example: cheap enough for every epoch whatever T. The exact
        full-T bound, term by term, is ``pyrovae evaluate diffusion``. Given the
        test labels ``y`` (``--conditional``), the bound of log p(x | y)."""
        elbo = DiffusionELBO(num_particles=cfg.test_particles)
        bound = Bound.cat(
            elbo.terms(
                chain.model,
                chain.guide_posterior,
                x_test[i : i + batch_size],
                *(() if y is None else (y[i : i + batch_size],)),
            )
            for i in range(0, len(x_test), batch_size)
        )
        return prefixed(bound.summary(), "test")

    def write_figures(self, out: str, cfg, chain: DiffusionChain, ds: datasets.Dataset, x_test: torch.Tensor) -> None:
        write_samples(os.path.join(out, "samples.png"), chain, ds, min(cfg.sample_steps, chain.T), x_test)
        with torch.no_grad():
            bound = chain.bound(x_test[:TERMS_EXAMPLES], per_layer=True)
        plot_terms(os.path.join(out, "terms.png"), bound, f"bound terms, {len(bound)} test examples")


def write_samples(
    path: str, chain: DiffusionChain, ds: datasets.Dataset, steps: int, x_test: torch.Tensor, n: int | None = None
) -> None:
    """A grid of ``n`` (default 64) samples for images, or a scatter of ``n``
    (default 2,000) samples over the test data for 2-D data, drawn with the
    chain respaced to ``steps`` steps."""
    title = f"samples, {steps} of {chain.T} steps"
    if ds.is_image:
        images = from_chain_space(chain.sample(n or 64, steps=steps))
        plots.save_image_grid(path, images, ds.image_shape, min(8, len(images)), title)
    else:
        points = chain.sample(n or 2000, steps=steps)
        plots.save_scatter(
            path,
            torch.cat([x_test, points]),
            title,
            torch.cat([torch.zeros(len(x_test)), torch.ones(len(points))]),
            ("test data", "samples"),
        )


def plot_terms(path: str, bound: Bound, title: str) -> None:
    """The chain's per-layer KLs (a :meth:`DiffusionChain.bound` with ``per_layer``)
    with :func:`pyrovae.plots.plot_layer_kl`: layer l = t - 1 holds L_{t-1} = KL
    at x_{t-1} for l = 1..T-1, the top layer T holds L_T; the decoder term -L_0
    is ``recon``."""
    layers = [v.mean().item() for v in bound.layers.values()] + [bound.kl_top.mean().item()]
    plots.plot_layer_kl(
        path, layers, recon=bound.recon.mean().item(), title=title, layer="t - 1 (latent x_{t-1}; T: x_T)"
    )


def evaluate_bound(chain: DiffusionChain, x0: torch.Tensor, steps: int | None, chunk_size: int, run_dir: str) -> dict:
    """The full bound of ``chain`` (respaced to ``steps`` when given) on ``x0``,
    batched over t, per-example means in the bound's vocabulary
    (:mod:`pyrovae.infer.bound`): ``test_recon`` (the decoder term at t = 1),
    ``test_kl_top`` (L_T), ``test_kl_layers`` (sum of the per-t KLs),
    ``test_elbo``, ``test_bpd`` (images), and ``test_kl_t``, the list of
    L_{t-1} for t = 2..T; written to ``run_dir/evaluate-<steps>.json`` and
    drawn in ``evaluate-<steps>.png``."""
    steps = steps or chain.T
    if steps > chain.T:
        raise ValueError(f"steps must be <= T = {chain.T}, got {steps}")
    with torch.no_grad():
        bound = (chain.respaced(steps) if steps != chain.T else chain).bound(x0, chunk_size, per_layer=True)
    terms = bound_terms(bound.recon.mean().item(), bound.kl_top.mean().item(), bound.kl_layers.mean().item(), bound.dim)
    kl_t = [v.mean().item() for v in bound.layers.values()]
    result = {"n": len(x0), "steps": steps, **prefixed(terms, "test"), "test_kl_t": kl_t}
    name = f"evaluate-{steps}"
    folder = run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir)
    with open(os.path.join(folder, name + ".json"), "w") as f:
        json.dump(result, f, indent=2)
    plot_terms(os.path.join(folder, name + ".png"), bound, f"bound terms, {len(x0)} test examples, {steps} steps")
    return result
