"""The command line's sampler, ODE-likelihood and sample-quality flags for the
diffusion models (``pyrovae sample|evaluate diffusion|vdm``); :mod:`pyrovae.cli`
calls these.

    pyrovae sample diffusion RUN --sampler ddim --steps 20 [--eta 0]
    pyrovae evaluate vdm RUN --likelihood ode [--n 100]
    pyrovae evaluate diffusion RUN --samples 1000 --sampler dpm-solver++ --steps 20
"""

from __future__ import annotations

import argparse
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
    """``--likelihood`` for every model (``ode`` only for the diffusion models),
    and for those ``--samples N`` with the sampler's flags."""
    p.add_argument(
        "--likelihood",
        choices=LIKELIHOODS,
        default="elbo",
        help="elbo (the bound); ode adds the probability-flow ODE's bits/dim (diffusion models) (default: elbo)",
    )
    if not diffusion:
        return
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
        help="score N samples against the test split in the judge's features (FD, KID; 0 off) (default: 0)",
    )
    p.add_argument("--precision-recall", action="store_true", help="with --samples: also precision and recall (k = 3)")
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


def sample_quality(model, steps: int, args, ds, to_data, chunk: int = 500) -> dict:
    """FD and KID in the judge's features between ``args.samples`` samples and
    ``ds``'s test split, the judge trained (or read from its cache) on ``ds``'s
    training split; with the sampler, its steps and seconds per 1,000 samples."""
    from pyrovae.evaluate.judge import judge_for
    from pyrovae.evaluate.metrics import sample_scores

    if args.samples < 2:
        raise ValueError(f"--samples must be >= 2 for a score, got {args.samples}")
    judge = judge_for(ds)
    draw, _ = draw_function(model, steps, args, to_data)
    start = time.perf_counter()
    with torch.no_grad():
        samples = torch.cat([draw(min(chunk, args.samples - i)).float().cpu() for i in range(0, args.samples, chunk)])
    seconds = time.perf_counter() - start
    reference = torch.as_tensor(ds.x_test[:]).float().cpu()
    scores = sample_scores(judge, samples, reference, precision_and_recall=args.precision_recall)
    return {
        "sampler": args.sampler,
        "sample_steps": steps,
        **({"eta": args.eta} if args.sampler == "ddim" else {}),
        "seconds_per_1000_samples": 1000 * seconds / args.samples,
        **scores,
    }


def diffusion_scores(model, x_test: torch.Tensor, steps: int, args, cfg) -> dict:
    """What ``pyrovae evaluate diffusion|vdm`` adds to the bound: the ODE's
    bits/dim on ``x_test`` (``--likelihood ode``) and the sample scores
    (``--samples N``) against the test split of ``cfg``'s data set, whose
    training split trains the judge."""
    from pyrovae import data as datasets
    from pyrovae.recipes.diffusion import from_chain_space

    result = {}
    if args.likelihood == "ode":
        # VDM's decoder is always over the 256 bins; the chain's only for images
        result.update(ode_bits_per_dim(model, x_test, args, discrete=getattr(model, "discrete", True)))
    if args.samples:
        ds = datasets.load_from_config(cfg)
        result.update(sample_quality(model, steps, args, ds, from_chain_space if ds.is_image else (lambda x: x)))
    return result
