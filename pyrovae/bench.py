"""``pyrovae bench``: our speed against a hand-written PyTorch floor and Pyro's
stock ELBOs, measured side by side in one run and reported as ratios.

Each *case* (a workload at one size) has a set of *variants*: callables that do
the same work in different ways, one of them the plain-PyTorch floor. Every
variant is warmed up, then each repeat runs every variant once, in an order
rotated from repeat to repeat, so that a burst of load from other processes
hits all of them alike; a variant's figure is the median over repeats, and its
ratio is that median over the floor's.

Workloads:

- ``vae``: one SVI step of the default VAE (784 -> 400 -> 2x50, Bernoulli
  likelihood) at batch 16 and 128.
- ``diffusion``: one training step of the time-subsampled diffusion ELBO.
- ``bound``: the full-T bound (bits/dim) of a batch.
- ``sample``: ancestral sampling with all T steps and strided sampling.

Pyro's validation is off while timing (as for any mature model); the data are
random tensors of the right shape and range, since no step's cost depends on
their values.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO

from pyrovae.device import resolve_device
from pyrovae.infer import TraceAnalyticKL_ELBO
from pyrovae.vae.encoders import MIN_SCALE
from pyrovae.vae.model import VAE, build_vae

WORKLOADS = ("vae",)
FLOOR = "torch (floor)"


@dataclass
class Sizes:
    """How big and how often: :data:`FULL` for figures, :data:`SMOKE` to check
    that every variant runs (seconds, not minutes)."""

    repeats: int = 11
    warmup: int = 3
    vae_batches: tuple = (16, 128)
    vae_hidden: tuple = (400,)
    vae_z_dim: int = 50
    image_shape: tuple = (1, 28, 28)


FULL = Sizes()
SMOKE = Sizes(repeats=2, warmup=1, vae_batches=(4,), vae_hidden=(16,), vae_z_dim=2, image_shape=(1, 4, 4))


@dataclass
class Case:
    """One row group of the table: variants doing the same work, the floor
    among them, and the issue's target for ``target_variant`` (ratio to floor)."""

    workload: str
    name: str
    variants: dict
    target: float | None = None
    target_variant: str | None = None
    note: str = ""


@dataclass
class Result:
    workload: str
    case: str
    variant: str
    ms: float
    ratio: float
    times_ms: list = field(default_factory=list)
    target: float | None = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(variants: dict, repeats: int, warmup: int, device: torch.device) -> dict:
    """``{name: [ms per call, one per repeat]}``. Each variant is called
    ``warmup`` times first (JIT compilation, allocator, caches); then every
    repeat calls each variant once, starting one later in the list than the
    repeat before, so no variant always runs first or last."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    _synchronize(device)
    times = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            variants[name]()
            _synchronize(device)
            times[name].append(1000.0 * (time.perf_counter() - start))
    return times


# --- vae -----------------------------------------------------------------------------


def vae_torch_step(vae: VAE, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> float:
    """The floor: one Adam step on -ELBO(x) summed over the batch, written in
    plain torch with the VAE's own networks,

        z = mu + sigma * eps,   -ELBO = -sum_d log Bernoulli(x_d; logits_d(z)) + KL(N(mu, sigma^2) || N(0, I)),

    the same estimator ``TraceAnalyticKL_ELBO`` computes (the encoder's MLP is
    called directly: its split and softplus are repeated here)."""
    optimizer.zero_grad(set_to_none=True)
    loc, raw_scale = vae.encoder.net(x).split(vae.z_dim, dim=-1)
    scale = F.softplus(raw_scale) + MIN_SCALE
    z = loc + scale * torch.randn_like(loc)
    log_lik = -F.binary_cross_entropy_with_logits(vae.decoder(z), x, reduction="sum")
    kl = 0.5 * (loc**2 + scale**2 - 1).sum() - scale.log().sum()
    loss = kl - log_lik
    loss.backward()
    optimizer.step()
    return loss.item()


def vae_cases(sizes: Sizes, device: torch.device):
    """One SVI step of the default VAE per batch size: our analytic-KL ELBO,
    Pyro's four stock ELBOs and the torch floor, all on one VAE (one set of
    parameters in the param store) with their own Adam states."""
    x_dim = math.prod(sizes.image_shape)
    for batch in sizes.vae_batches:
        pyro.clear_param_store()
        vae = build_vae(x_dim, sizes.vae_z_dim, sizes.vae_hidden).to(device)
        x = torch.bernoulli(torch.full((batch, x_dim), 0.3, device=device))
        elbos = {
            "pyrovae TraceAnalyticKL_ELBO": TraceAnalyticKL_ELBO(max_plate_nesting=1),
            "Trace_ELBO": Trace_ELBO(max_plate_nesting=1),
            "TraceMeanField_ELBO": TraceMeanField_ELBO(max_plate_nesting=1),
            "JitTrace_ELBO": JitTrace_ELBO(max_plate_nesting=1, ignore_jit_warnings=True),
            "JitTraceMeanField_ELBO": JitTraceMeanField_ELBO(max_plate_nesting=1, ignore_jit_warnings=True),
        }
        variants = {FLOOR: _bind(vae_torch_step, vae, torch.optim.Adam(vae.parameters(), lr=1e-3), x)}
        for name, elbo in elbos.items():
            svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=elbo)
            variants[name] = _bind(svi.step, x)
        target = 1.25 if batch < 128 else 1.10
        yield Case("vae", f"batch {batch}", variants, target, "pyrovae TraceAnalyticKL_ELBO")


def _bind(fn: Callable, *args) -> Callable:
    return lambda: fn(*args)


CASES = {"vae": vae_cases}


# --- running and reporting --------------------------------------------------------------


def header(device: torch.device, sizes: Sizes) -> dict:
    return {
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}".strip(),
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "threads": torch.get_num_threads(),
        "repeats": sizes.repeats,
        "warmup": sizes.warmup,
        "pyro_validation": False,
    }


def run_case(case: Case, sizes: Sizes, device: torch.device) -> list:
    times = time_variants(case.variants, sizes.repeats, sizes.warmup, device)
    floor = statistics.median(times[FLOOR])
    results = []
    for name, ts in times.items():
        ms = statistics.median(ts)
        target = case.target if name == case.target_variant else None
        results.append(Result(case.workload, case.name, name, ms, ms / floor, ts, target))
    return results


def format_table(head: dict, results: list) -> str:
    lines = [
        f"pyrovae bench: device {head['device']}, torch threads {head['threads']}, torch {head['torch']}, pyro {head['pyro']}",
        f"median of {head['repeats']} interleaved repeats after {head['warmup']} warm-up calls; Pyro validation off",
        "",
        f"{'workload':<10} {'case':<26} {'variant':<36} {'ms':>10} {'x floor':>8}  target",
    ]
    previous = None
    for r in results:
        if previous is not None and (r.workload, r.case) != previous:
            lines.append("")
        previous = (r.workload, r.case)
        target = ""
        if r.target is not None:
            target = f"<= {r.target:.2f}  {'met' if r.ratio <= r.target else 'MISSED'}"
        lines.append(f"{r.workload:<10} {r.case:<26} {r.variant:<36} {r.ms:>10.2f} {r.ratio:>8.2f}  {target}")
    return "\n".join(lines)


def run(workloads=WORKLOADS, device: str = "cpu", smoke: bool = False, repeats: int | None = None, json_path: str | None = None, seed: int = 0, log=print) -> dict:
    """Run the named workloads; print the table through ``log``; return (and
    write to ``json_path``) ``{"header": ..., "results": [...]}``."""
    for name in workloads:
        if name not in CASES:
            raise ValueError(f"unknown workload {name!r}; expected one of {', '.join(CASES)}")
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = resolve_device(device)
    sizes = SMOKE if smoke else FULL
    if repeats is not None:
        sizes = Sizes(**{**sizes.__dict__, "repeats": repeats})
    head = header(dev, sizes)
    results = []
    pyro.set_rng_seed(seed)
    with pyro.validation_enabled(False):
        for name in workloads:
            for case in CASES[name](sizes, dev):
                results.extend(run_case(case, sizes, dev))
    pyro.clear_param_store()
    log(format_table(head, results))
    report = {"header": head, "results": [r.__dict__ for r in results]}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report
