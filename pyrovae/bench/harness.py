"""The timing harness: a :class:`Case` is variants doing the same work, the
floor among them; :func:`time_variants` times them interleaved and
:func:`run_case` turns the times into :class:`Result` rows (median ms, ratio
to the floor). :class:`Sizes` says how big and how often."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

FLOOR = "torch (floor)"
# the trainer's step (pyrovae.train.train_step: LossModule, one torch optimiser, clip norm, finite check)
TRAINER = "pyrovae trainer step"
# stock SVI with pyrovae's one multi-tensor optimiser in pyro.optim's place
SVI_ONE_ADAM = "SVI + pyrovae.optim.Adam"
# the compiled path (pyrovae.compiled): the loss captured once per batch shape, compiled by inductor / replayed as is
TRAINER_COMPILED = "pyrovae trainer step --compile"
TRAINER_CAPTURED = "pyrovae trainer step, captured graph, no inductor"
FLOOR_COMPILED = "torch floor, loss torch.compile'd"
RUN_NO_VALIDATE = "pyrovae train vae --no-validate"
RUN_VALIDATE = "pyrovae train vae (validation on)"
RUN_COMPILED = "pyrovae train vae --no-validate --compile"
DDP = "2 processes, DDP (gloo), 1 thread each"
DDP_NO_SYNC = "2 processes, no gradient all-reduce (no_sync)"


@dataclass
class Sizes:
    """How big and how often: :data:`FULL` for figures, :data:`SMOKE` to check
    that every variant runs (seconds, not minutes)."""

    repeats: int = 31
    warmup: int = 3
    vae_batches: tuple = (16, 128)
    vae_hidden: tuple = (400,)
    vae_z_dim: int = 50
    image_shape: tuple = (1, 28, 28)
    denoisers: tuple = ("mlp", "unet")
    mlp_hidden: tuple = (256, 256, 256)
    unet_channels: int = 32
    diffusion_batch: int = 32
    diffusion_Ts: tuple = (100, 1000)
    literal_T: int = 100
    bound_T: int = 1000
    bound_batch: int = 8
    bound_T_unet: int = 100
    bound_batch_unet: int = 4
    sample_T: int = 1000
    sample_steps: int = 50
    sample_n: int = 64
    # network calls of the samplers' cases (pyrovae.diffusion.samplers)
    sampler_steps: tuple = (10, 20, 50)
    sampler_unet_steps: tuple = (10,)
    sampler_unet_n: int = 16
    slow_repeats: int = 7
    train_data: str = "mnist5k"
    train_size: int | None = None
    train_epochs: int = 2
    train_repeats: int = 5
    # ddp: 2 processes against 1; steps per timed call (a call's figure is ms per step)
    ddp_processes: int = 2
    ddp_vae_batch: int = 128
    ddp_vae_steps: int = 20
    ddp_unet_batch: int = 32
    ddp_unet_T: int = 1000
    ddp_unet_steps: int = 1
    # conditional: the twins' configs are the defaults (None) or these overrides (VAEConfig / DiffusionConfig fields)
    conditional_vae: dict | None = None
    conditional_diffusion: dict | None = None


FULL = Sizes()
SMOKE = Sizes(
    repeats=2,
    warmup=1,
    vae_batches=(4,),
    vae_hidden=(16,),
    vae_z_dim=2,
    image_shape=(1, 4, 4),
    mlp_hidden=(16, 16),
    unet_channels=4,
    diffusion_batch=4,
    diffusion_Ts=(5, 10),
    literal_T=5,
    bound_T=10,
    bound_batch=2,
    bound_T_unet=5,
    bound_batch_unet=2,
    sample_T=10,
    sample_steps=3,
    sample_n=2,
    sampler_steps=(2, 3),
    sampler_unet_steps=(2,),
    sampler_unet_n=2,
    slow_repeats=2,
    train_data="digits",
    train_size=32,
    train_epochs=1,
    train_repeats=2,
    ddp_vae_batch=8,
    ddp_vae_steps=2,
    ddp_unet_batch=4,
    ddp_unet_T=10,
    conditional_vae={"hidden": [16], "z_dim": 2, "batch_size": 4},
    conditional_diffusion={"channels": 4, "T": 10, "batch_size": 4},
)


@dataclass
class Case:
    """One row group of the table: variants doing the same work, the floor
    among them, and the issue's targets (ratio to the floor) per variant. The
    floor is the variant named ``reference``: :data:`FLOOR` but where a case
    compares two of our own steps (a conditional model against its twin)."""

    workload: str
    name: str
    variants: dict
    targets: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    # fewer repeats for cases whose calls take seconds (None: Sizes.repeats)
    repeats: int | None = None
    reference: str = FLOOR


@dataclass
class Result:
    workload: str
    case: str
    variant: str
    ms: float
    ratio: float
    times_ms: list = field(default_factory=list)
    target: float | None = None
    params: dict = field(default_factory=dict)
    reference: str = FLOOR  # the variant that ratio divides by


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timed:
    """What a variant returns when it times itself (a whole training run
    counts its training seconds only, not its set-up, evaluation or figures)."""

    ms: float


def time_variants(variants: dict, repeats: int, warmup: int, device: torch.device) -> dict:
    """``{name: [ms per call, one per repeat]}``. Each variant is called
    ``warmup`` times first (JIT compilation, allocator, caches); then every
    repeat calls each variant once, starting one later in the list than the
    repeat before, so no variant always runs first or last. A variant that
    returns :class:`Timed` is counted by its own figure, not the wall clock."""
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
            out = variants[name]()
            _synchronize(device)
            times[name].append(out.ms if isinstance(out, Timed) else 1000.0 * (time.perf_counter() - start))
    return times


def run_case(case: Case, sizes: Sizes, device: torch.device) -> list:
    """Time ``case``'s variants: one :class:`Result` per variant, its median ms
    and its ratio to the floor's (the case's ``reference``)."""
    # a slow case's calls take seconds: one warm-up call is enough there
    warmup = 1 if case.repeats else sizes.warmup
    times = time_variants(case.variants, case.repeats or sizes.repeats, warmup, device)
    floor = statistics.median(times[case.reference])
    results = []
    for name, ts in times.items():
        ms = statistics.median(ts)
        target = case.targets.get(name)
        results.append(Result(case.workload, case.name, name, ms, ms / floor, ts, target, case.params, case.reference))
    return results


def _bind(fn: Callable, *args) -> Callable:
    return lambda: fn(*args)


def _no_grad(fn: Callable, *args) -> Callable:
    def call():
        with torch.no_grad():
            return fn(*args)

    return call
