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
- ``sample``: ancestral sampling with all T steps and strided sampling; the
  samplers of :mod:`pyrovae.diffusion.samplers` (ancestral, DDIM, DPM-Solver++)
  at a few step counts against the denoiser's forward passes alone.
- ``m2``: one step of the semi-supervised VAE (M2), labelled and unlabelled
  examples in one batch, y summed exactly (:mod:`~pyrovae.bench.m2`).
- ``conditional``: one trainer step of the conditional VAE and diffusion
  chain (``--conditional``) against their unconditional twins, the reference
  in place of a floor (:mod:`~pyrovae.bench.conditional`).
- ``train``: a whole ``pyrovae train vae`` run (training seconds, as
  metrics.csv counts them) against a plain PyTorch loop over the same data,
  networks, optimiser and epochs.

Every floor steps the same optimiser as the library (``torch.optim.Adam``,
fused where the device has it, else multi-tensor: :func:`pyrovae.optim.make_optimizer`),
so that an optimiser the floor lacks cannot make a target look met.

Pyro's validation is off while timing (as for any mature model); the data are
random tensors of the right shape and range, since no step's cost depends on
their values.

The package: :mod:`~pyrovae.bench.harness` (timing), :mod:`~pyrovae.bench.floors`
(the hand-written torch references), :mod:`~pyrovae.bench.cases` (the
workloads; :mod:`~pyrovae.bench.m2` and :mod:`~pyrovae.bench.conditional`
their own modules), :mod:`~pyrovae.bench.ddp` (the worker processes of the ddp cases)
and :mod:`~pyrovae.bench.report` (header, checks, table); :func:`run` ties
them together.
"""

from __future__ import annotations

import json

import pyro
import torch

from pyrovae.bench.cases import (
    CASES,
    WORKLOADS,
    bound_cases,
    ddp_cases,
    diffusion_cases,
    pyrovae_run,
    sample_cases,
    train_cases,
    trainer_step,
    vae_cases,
)
from pyrovae.bench.conditional import conditional_cases, conditional_checks
from pyrovae.bench.ddp import ProcessGroup
from pyrovae.bench.floors import TorchDDPM, fast_adam, torch_run, vae_torch_loss, vae_torch_step
from pyrovae.bench.harness import (
    DDP,
    DDP_NO_SYNC,
    FLOOR,
    FLOOR_COMPILED,
    FULL,
    RUN_COMPILED,
    RUN_NO_VALIDATE,
    RUN_VALIDATE,
    SMOKE,
    SVI_ONE_ADAM,
    TRAINER,
    TRAINER_CAPTURED,
    TRAINER_COMPILED,
    Case,
    Result,
    Sizes,
    Timed,
    run_case,
    time_variants,
)
from pyrovae.bench.m2 import m2_cases, m2_torch_loss, m2_torch_step
from pyrovae.bench.report import (
    _load_average,
    compiled_checks,
    ddp_checks,
    format_case,
    format_checks,
    format_header,
    header,
    t_checks,
)
from pyrovae.checks import check_positive
from pyrovae.device import resolve_device
from pyrovae.registry import lookup

__all__ = [
    "CASES",
    "DDP",
    "DDP_NO_SYNC",
    "FLOOR",
    "FLOOR_COMPILED",
    "FULL",
    "RUN_COMPILED",
    "RUN_NO_VALIDATE",
    "RUN_VALIDATE",
    "SMOKE",
    "SVI_ONE_ADAM",
    "TRAINER",
    "TRAINER_CAPTURED",
    "TRAINER_COMPILED",
    "WORKLOADS",
    "Case",
    "ProcessGroup",
    "Result",
    "Sizes",
    "Timed",
    "TorchDDPM",
    "bound_cases",
    "compiled_checks",
    "conditional_cases",
    "conditional_checks",
    "ddp_cases",
    "ddp_checks",
    "diffusion_cases",
    "fast_adam",
    "format_case",
    "format_checks",
    "format_header",
    "header",
    "m2_cases",
    "m2_torch_loss",
    "m2_torch_step",
    "pyrovae_run",
    "run",
    "run_case",
    "sample_cases",
    "t_checks",
    "time_variants",
    "torch_run",
    "train_cases",
    "trainer_step",
    "vae_cases",
    "vae_torch_loss",
    "vae_torch_step",
]


def run(
    workloads=WORKLOADS,
    device: str = "cpu",
    smoke: bool = False,
    repeats: int | None = None,
    json_path: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    log=print,
) -> dict:
    """Run the named workloads; print the table through ``log``, one case at a
    time as it finishes; return (and
    write to ``json_path``) ``{"header": ..., "results": [...], "checks": [...]}``.

    :param threads: torch's intra-op threads for the run (restored afterwards);
        default: whatever torch has.
    """
    for name in workloads:
        lookup("workload", name, CASES)
    for name, value in (("repeats", repeats), ("threads", threads)):
        if value is not None:
            check_positive(value, name)
    dev = resolve_device(device)
    sizes = SMOKE if smoke else FULL
    if repeats is not None:
        sizes = Sizes(**{**sizes.__dict__, "repeats": repeats})
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        head = header(dev, sizes)
        log(format_header(head))
        results = []
        pyro.set_rng_seed(seed)
        with pyro.validation_enabled(False):
            for name in workloads:
                for case in CASES[name](sizes, dev):
                    rows = run_case(case, sizes, dev)
                    log(format_case(rows) + "\n")
                    results.extend(rows)
    finally:
        torch.set_num_threads(previous_threads)
        pyro.clear_param_store()
    checks = t_checks(results)
    if checks:
        log(format_checks(checks))
    compiled = compiled_checks(results)
    ddp = ddp_checks(results)
    conditional = conditional_checks(results)
    for c in compiled + ddp + conditional:
        log(c["check"])
    head["load_average_end"] = _load_average()
    log(f"load average (1, 5, 15 min) at the start {head['load_average']}, at the end {head['load_average_end']}")
    report = {
        "header": head,
        "results": [r.__dict__ for r in results],
        "checks": checks,
        "compiled": compiled,
        "ddp": ddp,
        "conditional": conditional,
    }
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
    return report
