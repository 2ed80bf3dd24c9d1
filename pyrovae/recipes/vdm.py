"""How ``pyrovae train vdm`` builds, feeds, evaluates and draws a variational
diffusion model (its recipe for the shared loop in :mod:`pyrovae.train`; its
config is :class:`pyrovae.config.VDMConfig`), and how ``pyrovae sample|evaluate
vdm`` use a finished run."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from pyrovae import data as datasets
from pyrovae import plots
from pyrovae.cli import positive_int
from pyrovae.config import option, override
from pyrovae.diffusion.denoisers import TimeMLP, UNet
from pyrovae.diffusion.gamma import SCHEDULES, make_gamma
from pyrovae.diffusion.vdm import FOURIER_EXPONENTS, VDM
from pyrovae.evaluate.commands import add_evaluate_flags, add_sampler_flags, draw_function, ode_scores
from pyrovae.infer.bound import Bound, bits_per_dim, prefixed
from pyrovae.infer.bound import bound_terms as named_terms
from pyrovae.infer.vdm_elbo import TERMS, VDMELBO
from pyrovae.recipes.base import Recipe
from pyrovae.recipes.conditional import num_classes
from pyrovae.recipes.diffusion import _DiffusionTraining, from_chain_space, to_chain_space

NETS = ("unet", "mlp")
CONTINUOUS = "continuous"


def parse_time(time: str) -> int | None:
    """``"continuous"`` -> None (the model of L_inf); ``"T"`` (digits) -> T steps."""
    if time == CONTINUOUS:
        return None
    if isinstance(time, str) and time.isdigit() and int(time) >= 1:
        return int(time)
    raise ValueError(f"time must be 'continuous' or a number of steps T >= 1, got {time!r}")


@dataclass
class VDMConfig(_DiffusionTraining):
    """``pyrovae train vdm``: a variational diffusion model, continuous time with a
    learned noise schedule (see docs/vdm), for 8-bit images, with the diffusion
    chain's optimiser settings and EMA weights for evaluation; 28 epochs, about
    10 CPU minutes on mnist5k, where it reaches 1.78 bits/dim (docs/vdm.md)."""

    model: str = override("model", "vdm")
    epochs: int = override(
        "epochs",
        28,
        help="passes over the training set (28: the 10 minutes of one CPU thread on mnist5k that docs/vdm.md measures)",
    )
    schedule: str = option(
        "learned-linear",
        "noise schedule gamma(t): fixed linear, linear with learned end points, or VDM's monotone network",
        choices=SCHEDULES,
    )
    time: str = option(
        "continuous",
        "continuous (the bound L_inf) or a number of steps T (the T-step model and its bound L_T)",
        check=parse_time,
    )
    fourier: bool = option(False, "Fourier features sin, cos(2^n 2 pi z_t), n = 6, 7, as extra denoiser inputs")
    minimise_variance: bool = option(
        False, "train the schedule's interior to minimise the bound estimate's variance (learned-net, continuous time)"
    )
    net: str = option("unet", "denoiser", choices=NETS)
    channels: int = option(16, "U-Net base channels", ge=1)
    hidden: list[int] = option([256, 256, 256], "MLP denoiser widths", ge=1)
    sample_steps: int = option(100, "ancestral steps for the samples figure", ge=1)


class VDMRecipe(Recipe):
    elbo_unit = "ELBO (nats per example)"
    evaluate_help = "the bound in bits/dim on the first N test examples, with its standard error"

    def check(self, cfg) -> None:
        """Raise ``ValueError`` for VDM settings that cannot work."""
        T = parse_time(cfg.time)
        if cfg.data in datasets.TOY_DATASETS:
            raise ValueError(
                f"vdm models 8-bit images (its decoder is over the 256 pixel values); {cfg.data!r} is "
                "continuous 2-D data: use `pyrovae train diffusion`"
            )
        if cfg.minimise_variance and (T is not None or cfg.schedule != "learned-net"):
            raise ValueError(
                "minimise_variance trains the interior of a learned-net schedule in continuous time; "
                f"got schedule {cfg.schedule!r}, time {cfg.time!r}"
            )

    def build(self, cfg, ds: datasets.Dataset) -> VDM:
        if not ds.is_image:
            raise ValueError(f"vdm needs image data; {ds.name!r} has examples of shape {ds.image_shape}")
        # the denoiser sees z_t and, with Fourier features, 2 |n| more blocks of D
        k = 1 + 2 * len(FOURIER_EXPONENTS) if cfg.fourier else 1
        c, h, w = ds.image_shape
        classes = num_classes(cfg, ds)
        net = (
            UNet((k * c, h, w), cfg.channels, num_classes=classes)
            if cfg.net == "unet"
            else TimeMLP(k * ds.x_dim, cfg.hidden, num_classes=classes)
        )
        return VDM(net, make_gamma(cfg.schedule), ds.x_dim, T=parse_time(cfg.time), fourier=cfg.fourier)

    def objective(self, cfg) -> VDMELBO:
        return VDMELBO(minimise_variance=cfg.minimise_variance)

    def prepare_batch(self, cfg, x: torch.Tensor) -> torch.Tensor:
        return to_chain_space(x)

    @torch.no_grad()
    def evaluate(self, cfg, vdm: VDM, x_test: torch.Tensor, batch_size: int = 500, y=None) -> dict:
        """The test bound's terms per example (nats; an unbiased estimate with
        ``cfg.test_particles`` draws of t per example), bits/dim, and the
        schedule's end points gamma(0), gamma(1). ``pyrovae evaluate vdm`` gives
        the bound with its standard error."""
        bound = bound_terms(vdm, x_test, cfg.test_particles, batch_size, y)  # given y: of log p(x | y)
        return {**prefixed(bound.summary(), "test"), **schedule_ends(vdm)}

    def write_figures(self, out: str, cfg, vdm: VDM, ds: datasets.Dataset, x_test: torch.Tensor) -> None:
        write_samples(os.path.join(out, "samples.png"), vdm, ds, cfg.sample_steps)
        t = torch.linspace(0, 1, 201, dtype=vdm.gamma.gamma_min.dtype, device=vdm.gamma.gamma_min.device)
        with torch.no_grad():
            gamma = vdm.gamma(t).cpu().tolist()
        plots.plot_curves(
            os.path.join(out, "schedule.png"),
            t.cpu().tolist(),
            {"gamma(t)": gamma},
            "t",
            "gamma(t) = log(sigma_t^2 / alpha_t^2)",
            f"learned noise schedule ({cfg.schedule})",
        )

    def add_sample_arguments(self, parser) -> None:
        add_sampler_flags(parser)
        parser.add_argument(
            "--steps",
            type=positive_int,
            default=None,
            help="ancestral steps on an even grid of [0, 1] (default: the run's sample_steps)",
        )

    def sampler(self, vdm: VDM, cfg, ds, args) -> tuple:
        """Samples in [0, 1] on ``--steps`` times: the ancestral sampler on any number of
        them (not a respaced chain), or ``--sampler``'s."""
        # every sampler through the one path (which checks the steps), so that a flag the sampler has
        # no use for is refused, not ignored
        return draw_function(vdm, self.sample_steps(vdm, cfg, args), args, from_chain_space)

    def sample_steps(self, vdm: VDM, cfg, args) -> int:
        return args.steps or cfg.sample_steps

    def add_evaluate_arguments(self, parser) -> None:
        # a count below 1 is a usage error (exit 2), as every flag's bound
        parser.add_argument("--n", type=positive_int, default=100, help="first N test examples (default: 100)")
        parser.add_argument(
            "--replicates",
            type=positive_int,
            default=10,
            help="independent estimates of the bound; its standard error comes from their spread (default: 10)",
        )
        parser.add_argument(
            "--draws",
            type=positive_int,
            default=10,
            help="antithetic draws of t per example in each replicate (default: 10)",
        )
        add_evaluate_flags(parser, diffusion=True)
        parser.add_argument(
            "--steps",
            type=positive_int,
            default=None,
            help="with --samples: sampler steps (default: the run's sample_steps)",
        )

    def run_evaluate(self, args, vdm: VDM, cfg, x_test: torch.Tensor) -> dict:
        """The bound with its standard error (:func:`evaluate_bound`) on the first ``--n`` test
        examples, with the ODE's bits/dim when asked for."""
        for name in ("n", "replicates", "draws"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
        result = evaluate_bound(vdm, x_test[: args.n], args.replicates, args.draws, args.run)
        return {**result, **ode_scores(vdm, x_test[: args.n], args)}


def schedule_ends(vdm: VDM) -> dict:
    with torch.no_grad():
        return {"gamma_0": vdm.gamma.gamma_min.item(), "gamma_1": vdm.gamma.gamma_max.item()}


def bound_terms(vdm: VDM, x: torch.Tensor, draws: int, batch_size: int = 500, y=None) -> Bound:
    """:meth:`VDM.bound` over ``x`` in batches: ``recon``, ``kl_top`` and
    ``kl_layers`` per example, ``(N,)``, with ``draws`` antithetic draws of t
    per example."""
    return Bound.cat(
        vdm.bound(x[i : i + batch_size], draws, None if y is None else y[i : i + batch_size])
        for i in range(0, len(x), batch_size)
    )


@torch.no_grad()
def evaluate_bound(vdm: VDM, x: torch.Tensor, replicates: int, draws: int, run_dir: str, batch_size: int = 500) -> dict:
    """The bound on ``x`` in the vocabulary every model uses
    (:mod:`pyrovae.infer.bound`), per-example means: ``test_recon`` (E log p(x |
    z_0)), ``test_kl_top`` (KL(q(z_1|x) || N(0, I))), ``test_kl_layers`` (the
    diffusion term L_inf, or L_T), ``test_elbo`` and ``test_bpd``, averaged
    over ``replicates`` independent estimates (each: ``draws`` antithetic draws
    of t per example and one z_0 per example), and ``test_bpd_se``, the
    standard error of ``test_bpd`` from the spread across replicates (the
    draws inside one replicate are dependent, so that spread is the honest
    one). Written to ``run_dir/evaluate.json``."""
    if replicates < 2:
        raise ValueError(f"replicates must be >= 2 for a standard error, got {replicates}")
    reps = [bound_terms(vdm, x, draws, batch_size) for _ in range(replicates)]
    bpd = torch.stack([bits_per_dim(-r.elbo().mean(), vdm.x_dim) for r in reps])
    means = {k: torch.stack([getattr(r, k).mean() for r in reps]).mean().item() for k in TERMS}
    result = {
        "n": len(x),
        "time": "continuous" if vdm.T is None else vdm.T,
        "replicates": replicates,
        "draws": draws,
        **prefixed(named_terms(means["recon"], means["kl_top"], means["kl_layers"], vdm.x_dim), "test"),
        "test_bpd_se": (bpd.std() / math.sqrt(replicates)).item(),
        **schedule_ends(vdm),
    }
    folder = run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir)
    with open(os.path.join(folder, "evaluate.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def write_samples(path: str, vdm: VDM, ds: datasets.Dataset, steps: int, n: int | None = None) -> None:
    """A grid of ``n`` (default 64) ancestral samples on a grid of ``steps`` times."""
    images = from_chain_space(vdm.sample(n or 64, steps=steps))
    plots.save_image_grid(path, images, ds.image_shape, min(8, len(images)), f"samples, {steps} steps")
