"""The command line's sampler and ODE-likelihood flags for the diffusion models
(``pyrovae sample|evaluate diffusion|vdm``) and the sample-quality scores of
every model (``pyrovae evaluate MODEL RUN --samples N``); :mod:`pyrovae.cli`
calls these.

    pyrovae sample diffusion RUN --sampler ddim --steps 20 [--eta 0]
    pyrovae evaluate vdm RUN --likelihood ode [--n 100]
    pyrovae evaluate diffusion RUN --samples 1000 --sampler dpm-solver++ --steps 20
    pyrovae evaluate vdm RUN --samples 1000 --guidance 1   (a run trained with --conditional)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import torch

from pyrovae.diffusion.samplers import SAMPLERS, SPACINGS, check_sampler_args, sample

LIKELIHOODS = ("elbo", "ode")


def _eta(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def _samples(text: str) -> int:
    """``--samples``: 0 (off) or enough samples for a score; a usage error (exit 2) otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value == 1 or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or an integer >= 2 (a score needs two), got {text}")
    return value


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """``--sampler``, ``--eta``, ``--spacing``, ``--clip-x0`` (``--steps`` is each model's own)."""
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="ancestral",
        help="ancestral (the model's own), ddim or dpm-solver++ (2M) (default: ancestral)",
    )
    p.add_argument("--eta", type=_eta, default=0.0, help="DDIM's noise in [0, 1]: 0 deterministic (default: 0)")
    p.add_argument(
        "--spacing",
        choices=SPACINGS,
        default=None,
        help="the sampler's grid: equal steps in t or in log-SNR (default: time; logsnr for dpm-solver++)",
    )
    p.add_argument(
        "--clip-x0",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="clamp each x0 estimate to [-1, 1] (default: on for the chain's images, as its own sampler)",
    )


def add_evaluate_flags(p: argparse.ArgumentParser, diffusion: bool) -> None:
    """``--likelihood`` (``ode`` only for the diffusion models), ``--samples N``
    with ``--guidance`` for every model, and for the diffusion models the
    sampler's flags."""
    from pyrovae.cli import guidance_weight

    p.add_argument(
        "--likelihood",
        choices=LIKELIHOODS,
        default="elbo",
        help="elbo (the bound); ode adds the probability-flow ODE's bits/dim (diffusion models) (default: elbo)",
    )
    if diffusion:
        p.add_argument(
            "--exact-divergence",
            action="store_true",
            help="ODE: the divergence by D backward passes instead of Hutchinson's estimate (small D only)",
        )
    p.add_argument(
        "--samples",
        type=_samples,
        default=0,
        metavar="N",
        help="score N samples against the test split in the judge's features (FD, KID; 0 off); of a run trained "
        "with --conditional, N // K of each class and the share the judge puts in the class asked for (default: 0)",
    )
    p.add_argument("--precision-recall", action="store_true", help="with --samples: also precision and recall (k = 3)")
    p.add_argument(
        "--guidance",
        type=guidance_weight,
        default=None,
        metavar="W",
        help="with --samples, of a conditional chain or VDM: classifier-free guidance weight w >= 0 (default: 0)",
    )
    if diffusion:
        add_sampler_flags(p)


def check_likelihood(args, model_name: str) -> None:
    """``--likelihood ode`` on a model that has no ODE is one line."""
    if getattr(args, "likelihood", "elbo") == "ode" and model_name not in ("diffusion", "vdm"):
        raise ValueError(f"--likelihood ode needs a diffusion model (diffusion, vdm); {model_name!r} has no ODE")


def default_clip(model, args) -> bool:
    """The chain's own sampler clamps x0_hat for images; VDM's has no clipping."""
    clip = getattr(args, "clip_x0", None)
    if clip is not None:
        return clip
    return bool(getattr(model, "discrete", False)) and hasattr(model, "schedule")


def draw_function(model, steps: int, args, to_data):
    """``(draw, title)``: ``draw(k)`` gives k samples in the data's convention,
    drawn by ``args.sampler`` in ``steps`` network calls."""
    sampler, eta, spacing, clip = args.sampler, args.eta, args.spacing, default_clip(model, args)
    # bad combinations (eta with dpm-solver++, steps > T) fail here, before any file is written
    check_sampler_args(model, steps, sampler, eta, spacing)

    def draw(k: int) -> torch.Tensor:
        return to_data(sample(model, k, steps, sampler, eta=eta, clip_x0=clip, spacing=spacing))

    extra = f", eta {eta:g}" if sampler == "ddim" else ""
    return draw, f"samples, {sampler}{extra}, {steps} steps"


def ode_bits_per_dim(model, x_test: torch.Tensor, args, discrete: bool) -> dict:
    """``test_ode_bpd`` (per-example mean; a bound on the discrete data's when
    ``discrete``: uniformly dequantised) and ``test_ode_bpd_se`` (its standard
    error over the examples, which includes the probes' variance), the
    network evaluations per example's solve ``ode_nfe`` and ``ode_seconds``."""
    from pyrovae.diffusion.ode import ode_log_likelihood

    start = time.perf_counter()
    result = ode_log_likelihood(
        model, x_test, exact_divergence=args.exact_divergence, dequantise=discrete, seed=args.seed
    )
    bpd = result["bits_per_dim"].double()
    name = "test_ode_bpd" if discrete else "test_ode_nats_per_dim"
    values = bpd if discrete else bpd * math.log(2)
    return {
        name: float(values.mean()),
        f"{name}_se": float(values.std() / math.sqrt(len(values))) if len(values) > 1 else float("nan"),
        "ode_n": len(values),
        "ode_nfe": result["nfe"],
        "ode_divergence": "exact" if args.exact_divergence else "hutchinson",
        "ode_dequantised": discrete,
        "ode_seconds": time.perf_counter() - start,
    }


def check_sample_flags(args, cfg, model) -> None:
    """``pyrovae evaluate``'s ``--samples`` and ``--guidance``, checked before
    anything is computed: guidance weighs the samples of a conditional chain or
    VDM, and M2 (``--labelled``) has no sampler."""
    from pyrovae.recipes.conditional import DIFFUSION_MODELS

    if args.samples and not hasattr(model, "sample"):
        raise ValueError(
            f"--samples needs a model that samples; run {args.run!r} holds a {type(model).__name__} "
            "(--labelled, M2), which has no sample method"
        )
    if args.guidance is None:
        return
    if not args.samples:
        raise ValueError("--guidance weighs the samples that --samples N scores; give --samples N")
    if cfg.model not in DIFFUSION_MODELS:
        raise ValueError(f"--guidance is classifier-free guidance of the chain and VDM; a {cfg.model} has none")
    if not getattr(cfg, "conditional", False):
        raise ValueError(f"--guidance needs a run trained with --conditional; {args.run!r} is unconditional")


def sample_quality(args, model, cfg, recipe, chunk: int = 500) -> dict:
    """``args.samples`` samples of the run (``recipe.sampler``, as ``pyrovae
    sample`` draws them; a conditional run's balanced over its classes) scored
    against the test split of ``--data`` (default the run's) in the features of
    the judge trained on its training split (read from its cache): FD and KID,
    the sampler and its steps (diffusion models) and seconds per 1,000 samples.
    Of a conditional run also ``sample_class_accuracy``, the share of samples
    the judge puts in the class asked for, and the ``guidance`` weight (``None``
    for the VAEs)."""
    from pyrovae import data as datasets
    from pyrovae.checkpoint import load_checkpoint
    from pyrovae.evaluate.judge import judge_for
    from pyrovae.evaluate.metrics import sample_scores
    from pyrovae.recipes.conditional import DIFFUSION_MODELS

    # the sampler's flags are checked before the judge (minutes, the first time) is trained
    draw, _ = recipe.sampler(model, cfg, datasets.run_spec(load_checkpoint(args.run), cfg), args)
    ds = datasets.load_from_config(dataclasses.replace(cfg, data=args.data or cfg.data))
    judge = judge_for(ds)
    start = time.perf_counter()
    with torch.no_grad():
        samples = torch.cat([draw(min(chunk, args.samples - i)).float().cpu() for i in range(0, args.samples, chunk)])
    seconds = time.perf_counter() - start
    reference = torch.as_tensor(ds.x_test[:]).float().cpu()
    result = {}
    steps = recipe.sample_steps(model, cfg, args)
    if steps is not None:
        result.update(sampler=args.sampler, sample_steps=steps, **({"eta": args.eta} if args.sampler == "ddim" else {}))
    result["seconds_per_1000_samples"] = 1000 * seconds / args.samples
    if getattr(draw, "labels", None) is not None:
        result["guidance"] = (args.guidance or 0.0) if cfg.model in DIFFUSION_MODELS else None
        result["sample_class_accuracy"] = judge.accuracy(samples, draw.labels.cpu())
    return {**result, **sample_scores(judge, samples, reference, precision_and_recall=args.precision_recall)}


def ode_scores(model, x_test: torch.Tensor, args) -> dict:
    """What ``--likelihood ode`` adds to ``pyrovae evaluate diffusion|vdm``'s
    bound: the ODE's bits/dim on ``x_test``."""
    if args.likelihood != "ode":
        return {}
    # VDM's decoder is always over the 256 bins; the chain's only for images
    return ode_bits_per_dim(model, x_test, args, discrete=getattr(model, "discrete", True))
