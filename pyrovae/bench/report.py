"""The report: the run's header, the checks computed across cases, and the
table's lines."""

from __future__ import annotations

import os
import platform

import pyro
import torch

from pyrovae.bench.harness import DDP, DDP_NO_SYNC, FLOOR, FLOOR_COMPILED, TRAINER_COMPILED, Sizes


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
        "slow_repeats": sizes.slow_repeats,
        "train_repeats": sizes.train_repeats,
        "pyro_validation": False,
        "cpus": os.cpu_count(),
        "load_average": _load_average(),
    }


def _load_average() -> list | None:
    """The machine's 1, 5 and 15 minute load averages (``None`` where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def t_checks(results: list) -> list:
    """The diffusion step's growth with T, per denoiser: DiffusionELBO's ratio
    to the floor at the largest T over that at the smallest (target <= 1.1).
    The floor's cost does not depend on T, so dividing by it cancels the load
    that differs between the two cases, which were not interleaved."""
    ours = [r for r in results if r.workload == "diffusion" and r.variant == "pyrovae DiffusionELBO"]
    checks = []
    for denoiser in dict.fromkeys(r.params["denoiser"] for r in ours):
        rows = sorted((r for r in ours if r.params["denoiser"] == denoiser), key=lambda r: r.params["T"])
        if len(rows) > 1:
            lo, hi = rows[0], rows[-1]
            name = (
                f"diffusion {denoiser}: DiffusionELBO step at T={hi.params['T']} / at T={lo.params['T']} (each x floor)"
            )
            checks.append({"check": name, "ratio": hi.ratio / lo.ratio, "target": 1.1})
    return checks


def compiled_checks(results: list) -> list:
    """Per vae case: the compiled trainer step against the floor compiled the
    same way (``torch.compile`` of its loss), reported beside its target
    against the eager floor."""
    checks = []
    for case in dict.fromkeys(r.case for r in results if r.workload == "vae"):
        rows = {r.variant: r for r in results if r.workload == "vae" and r.case == case}
        if TRAINER_COMPILED in rows and FLOOR_COMPILED in rows:
            ratio = rows[TRAINER_COMPILED].ms / rows[FLOOR_COMPILED].ms
            checks.append({"check": f"vae {case}: {TRAINER_COMPILED} / {FLOOR_COMPILED}: {ratio:.2f}", "ratio": ratio})
    return checks


def ddp_checks(results: list) -> list:
    """Per ddp case: samples per second with 2 processes and with 1, the speed-up
    (the limit is the number of processes, on as many free cores), and the ms a
    step spends in the gradients' all-reduce (DDP's step less no_sync's)."""
    checks = []
    for case in dict.fromkeys(r.case for r in results if r.workload == "ddp"):
        rows = {r.variant: r for r in results if r.workload == "ddp" and r.case == case}
        one, two, alone = rows[FLOOR], rows[DDP], rows[DDP_NO_SYNC]
        batch, world = one.params["batch"], one.params["processes"]
        checks.append(
            {
                "check": f"ddp {case}: samples/s {world} processes {1000 * batch / two.ms:.0f} "
                f"vs 1 process {1000 * batch / one.ms:.0f}; speed-up {one.ms / two.ms:.2f} (limit {world}); "
                f"all-reduce {two.ms - alone.ms:.2f} ms of a {two.ms:.2f} ms step",
                "ratio": one.ms / two.ms,
                "limit": world,
                "samples_per_s": {"1": 1000 * batch / one.ms, str(world): 1000 * batch / two.ms},
                "allreduce_ms": two.ms - alone.ms,
            }
        )
    return checks


def format_header(head: dict) -> str:
    return "\n".join(
        [
            f"pyrovae bench: device {head['device']}, torch threads {head['threads']}, "
            f"torch {head['torch']}, pyro {head['pyro']}; {head['cpus']} CPUs, load average {head['load_average']}",
            f"median of {head['repeats']} interleaved repeats after {head['warmup']} warm-up calls "
            f"({head['slow_repeats']} after 1 for the U-Net, the full-T bound and ancestral sampling; "
            f"{head['train_repeats']} after 1 for whole runs); Pyro validation off",
            "",
            f"{'workload':<11} {'case':<30} {'variant':<50} {'ms':>10} {'x floor':>8}  target",
        ]
    )


def format_case(results: list) -> str:
    """One case's rows: ms, ratio to the floor, and the target where there is one."""
    lines = []
    for r in results:
        target = ""
        if r.target is not None:
            target = f"<= {r.target:.2f}  {'met' if r.ratio <= r.target else 'MISSED'}"
        lines.append(f"{r.workload:<11} {r.case:<30} {r.variant:<50} {r.ms:>10.2f} {r.ratio:>8.2f}  {target}")
    return "\n".join(lines)


def format_checks(checks: list) -> str:
    return "\n".join(
        f"{c['check']}: {c['ratio']:.2f}  <= {c['target']:.2f}  {'met' if c['ratio'] <= c['target'] else 'MISSED'}"
        for c in checks
    )
