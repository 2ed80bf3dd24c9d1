"""How ``pyrovae train diffusion`` builds, feeds, evaluates and draws a
diffusion chain (its recipe for the shared loop in :mod:`pyrovae.train`), and
how ``pyrovae sample|evaluate diffusion`` load a finished run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from pyrovae import data as datasets
from pyrovae import plots
from pyrovae.cli import positive_int
from pyrovae.config import AUTO, TrainConfig, option, override
from pyrovae.diffusion.chain import PARAMETERIZATIONS, VARIANCES, DiffusionChain
from pyrovae.diffusion.denoisers import TimeMLP, UNet
from pyrovae.diffusion.schedule import SCHEDULES, NoiseSchedule
from pyrovae.evaluate.commands import add_evaluate_flags, add_sampler_flags, draw_function, ode_scores
from pyrovae.infer.bound import Bound, bound_terms, prefixed
from pyrovae.infer.diffusion_elbo import TIME_SAMPLERS, DiffusionELBO
from pyrovae.infer.losses import OBJECTIVES, make_objective
from pyrovae.recipes.base import Recipe
from pyrovae.recipes.conditional import num_classes
from pyrovae.registry import lookup

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


@dataclass
class _DiffusionTraining(TrainConfig):
    """The optimiser settings the diffusion chain and VDM share: small batches, a
    lower learning rate, EMA weights for evaluation and a one-draw-per-image
    (unbiased) per-epoch test bound."""

    epochs: int = override("epochs", 20)
    batch_size: int = override("batch_size", 64)
    lr: float = override("lr", 5e-4)
    ema_decay: float | None = override("ema_decay", 0.995)
    eval_every: int = override("eval_every", 5)
    test_particles: int = override(
        "test_particles", 1, help="draws of t per test example for the per-epoch (unbiased) test ELBO"
    )
    p_uncond: float = option(
        0.1,
        "--conditional: probability that a training label is dropped to the null class (classifier-free guidance)",
        ge=0,
        lt=1,
    )


@dataclass
class DiffusionConfig(_DiffusionTraining):
    """``pyrovae train diffusion``: a diffusion chain. Its defaults give
    digit-like samples and about 2 bits/dim on mnist5k in minutes on 2 CPU
    cores (docs/diffusion.md), with EMA weights for evaluation; ``objective``,
    ``variance`` and ``net`` follow the data (:meth:`data_defaults`)."""

    model: str = override("model", "diffusion")
    T: int = option(1000, "number of diffusion steps", ge=1)
    schedule: str = option("linear", "noise schedule beta_t", choices=SCHEDULES)
    net: str = option(AUTO, "denoiser (auto: unet for images, mlp for 2-D data)", choices=NETS)
    channels: int = option(16, "U-Net base channels", ge=1)
    hidden: list[int] = option([256, 256, 256], "MLP denoiser widths", ge=1)
    objective: str = option(
        AUTO,
        "elbo (the bound), simple (Ho et al.'s L_simple, not the ELBO) or hybrid (learned variances); "
        "auto: hybrid for images, elbo for 2-D data",
        choices=(AUTO, *OBJECTIVES),
    )
    parameterization: str = option("eps", "what the denoiser predicts", choices=PARAMETERIZATIONS)
    variance: str = option(
        AUTO,
        "sigma_t^2 of p_theta(x_{t-1}|x_t); auto: learned for images, beta_tilde for 2-D data",
        choices=(AUTO, *VARIANCES),
    )
    time_sampler: str = option("uniform", "how t is drawn per example", choices=TIME_SAMPLERS)
    sample_steps: int = option(50, "respaced steps for the samples figure", ge=1)

    def data_defaults(self, kind: str) -> dict:
        # improved DDPM's hybrid objective with learned variances is what gets
        # images to ~2 bits/dim in minutes; the 2-D toys train best on the
        # plain bound with fixed variances.
        image = kind == "image"
        return {
            "objective": "hybrid" if image else "elbo",
            "variance": "learned" if image else "beta_tilde",
            "net": "unet" if image else "mlp",
        }


class DiffusionRecipe(Recipe):
    evaluate_help = "the full-T bound (bits/dim for images) on the first N test examples"

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
            lookup(name, getattr(cfg, name), allowed)
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
                "channels, sample_steps and hidden sizes must be >= 1, "
                f"got {cfg.channels}, {cfg.sample_steps}, {cfg.hidden}"
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

    @torch.no_grad()
    def evaluate(self, cfg, chain: DiffusionChain, x_test: torch.Tensor, batch_size: int = 500, y=None) -> dict:
        """The bound's named terms (:mod:`pyrovae.infer.bound`) per test example,
        in nats: ``test_recon``, ``test_kl_top``, ``test_kl_layers`` (the sum of
        the per-t KLs), ``test_elbo`` and, for images, ``test_bpd``; estimated
        without bias by :meth:`DiffusionELBO.terms` with ``cfg.test_particles``
        draws per example: cheap enough for every epoch whatever T. The exact
        full-T bound, term by term, is ``pyrovae evaluate diffusion``."""
        elbo = DiffusionELBO(num_particles=cfg.test_particles)
        batches = range(0, len(x_test), batch_size)
        given = (lambda i: ()) if y is None else (lambda i: (y[i : i + batch_size],))  # y: the bound of log p(x | y)
        bound = Bound.cat(
            elbo.terms(chain.model, chain.guide_posterior, x_test[i : i + batch_size], *given(i)) for i in batches
        )
        return prefixed(bound.summary(), "test")

    def write_figures(self, out: str, cfg, chain: DiffusionChain, ds: datasets.Dataset, x_test: torch.Tensor) -> None:
        write_samples(os.path.join(out, "samples.png"), chain, ds, min(cfg.sample_steps, chain.T), x_test)
        with torch.no_grad():
            bound = chain.bound(x_test[:TERMS_EXAMPLES], per_layer=True)
        plot_terms(os.path.join(out, "terms.png"), bound, f"bound terms, {len(bound)} test examples")

    def add_sample_arguments(self, parser) -> None:
        parser.add_argument(
            "--steps", type=positive_int, default=None, help="respace the chain to K steps (default: all T)"
        )
        add_sampler_flags(parser)

    def sampler(self, chain: DiffusionChain, cfg, ds, args) -> tuple:
        """Samples of ``--sampler`` on the chain respaced to ``--steps`` (default: all T), as data."""
        steps = self.sample_steps(chain, cfg, args)
        if steps > chain.T:
            raise ValueError(f"--steps must be <= T = {chain.T}, got {steps}")
        to_data = from_chain_space if ds.is_image else (lambda x: x)
        draw, title = draw_function(chain, steps, args, to_data)
        return draw, f"{title} of {chain.T}"

    def sample_steps(self, chain: DiffusionChain, cfg, args) -> int:
        return args.steps or chain.T

    def add_evaluate_arguments(self, parser) -> None:
        parser.add_argument("--n", type=positive_int, default=100, help="first N test examples (default: 100)")
        parser.add_argument(
            "--steps",
            type=positive_int,
            default=None,
            help="bound of the chain respaced to K steps (default: all T)",
        )
        parser.add_argument(
            "--chunk-size",
            type=positive_int,
            default=512,
            help="(t, example) pairs per network call (default: 512)",
        )
        add_evaluate_flags(parser, diffusion=True)

    def run_evaluate(self, args, chain: DiffusionChain, cfg, x_test: torch.Tensor) -> dict:
        """The full bound (:func:`evaluate_bound`) on the first ``--n`` test examples, with the
        ODE's bits/dim when asked for."""
        result = evaluate_bound(chain, x_test[: args.n], args.steps, args.chunk_size, args.run)
        return {**result, **ode_scores(chain, x_test[: args.n], args)}


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
