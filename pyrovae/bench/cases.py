"""The workloads: each yields :class:`~pyrovae.bench.harness.Case` objects
(a set of variants at one size, the floor among them, and the targets)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import pyro
import torch
from pyro.infer import SVI, JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled

from pyrovae.bench.conditional import conditional_cases
from pyrovae.bench.ddp import ProcessGroup
from pyrovae.bench.floors import TorchDDPM, fast_adam, torch_run, vae_torch_loss, vae_torch_step
from pyrovae.bench.harness import (
    DDP,
    DDP_NO_SYNC,
    FLOOR,
    FLOOR_COMPILED,
    RUN_COMPILED,
    RUN_NO_VALIDATE,
    RUN_VALIDATE,
    SVI_ONE_ADAM,
    TRAINER,
    TRAINER_CAPTURED,
    TRAINER_COMPILED,
    Case,
    Sizes,
    Timed,
    _bind,
    _no_grad,
)
from pyrovae.bench.m2 import m2_cases
from pyrovae.infer import TraceAnalyticKL_ELBO
from pyrovae.vae import build_vae

WORKLOADS = ("vae", "diffusion", "bound", "sample", "train", "ddp", "m2", "conditional")


def trainer_step(model, objective, compile: str | None = None) -> Callable:
    """The trainer's step (:func:`pyrovae.train.train_step`) on ``model`` and
    ``objective``, with its own optimiser (:func:`pyrovae.optim.make_optimizer`);
    ``compile="inductor"`` is ``--compile`` (:func:`pyrovae.compiled.compile_loss`),
    ``compile="graph"`` the captured graph replayed without inductor."""
    from pyrovae.compiled import compile_loss
    from pyrovae.optim import make_optimizer
    from pyrovae.train import LossModule, train_step

    loss_fn = LossModule(model, objective)
    if compile is not None:
        loss_fn = compile_loss(loss_fn, backend=None if compile == "graph" else compile)
    parameters = list(model.parameters())
    optimizer = make_optimizer("adam", parameters, 1e-3)
    return lambda x: train_step(loss_fn, parameters, optimizer, x)


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
        from pyrovae.optim import Adam as OneAdam

        variants = {FLOOR: _bind(vae_torch_step, vae, fast_adam(vae, 1e-3), x)}
        for name, elbo in elbos.items():
            svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=elbo)
            variants[name] = _bind(svi.step, x)
        variants[SVI_ONE_ADAM] = _bind(
            SVI(vae.model, vae.guide, OneAdam({"lr": 1e-3}), loss=TraceAnalyticKL_ELBO(max_plate_nesting=1)).step, x
        )
        variants[TRAINER] = _bind(trainer_step(vae, TraceAnalyticKL_ELBO(max_plate_nesting=1)), x)
        variants[TRAINER_CAPTURED] = _bind(trainer_step(vae, TraceAnalyticKL_ELBO(max_plate_nesting=1), "graph"), x)
        variants[TRAINER_COMPILED] = _bind(trainer_step(vae, TraceAnalyticKL_ELBO(max_plate_nesting=1), "inductor"), x)
        variants[FLOOR_COMPILED] = _bind(vae_torch_step, vae, fast_adam(vae, 1e-3), x, torch.compile(vae_torch_loss))
        # the targets are at batch 128; batch 16 (per-step overhead dominates) is reported
        targets = {TRAINER: 1.10, SVI_ONE_ADAM: 1.15, TRAINER_COMPILED: 1.00} if batch >= 128 else {}
        yield Case("vae", f"batch {batch}", variants, targets, {"batch": batch})


# --- diffusion ---------------------------------------------------------------------------


def _chain(sizes: Sizes, denoiser: str, T: int, device: torch.device):
    from pyrovae.diffusion.chain import DiffusionChain
    from pyrovae.diffusion.denoisers import TimeMLP, UNet
    from pyrovae.diffusion.schedule import NoiseSchedule

    x_dim = math.prod(sizes.image_shape)
    net = TimeMLP(x_dim, sizes.mlp_hidden) if denoiser == "mlp" else UNet(sizes.image_shape, sizes.unet_channels)
    return DiffusionChain(net, NoiseSchedule.from_name("linear", T), x_dim, decoder="discretised").to(device)


def _images(n: int, sizes: Sizes, device: torch.device) -> torch.Tensor:
    """8-bit pixels scaled to the 256 bin centres of [-1, 1]."""
    return torch.randint(0, 256, (n, math.prod(sizes.image_shape)), device=device) / 127.5 - 1


def diffusion_cases(sizes: Sizes, device: torch.device):
    """One training step on the time-subsampled diffusion ELBO per denoiser and
    T: ``DiffusionELBO`` through SVI vs the torch floor (same network, torch
    Adam), and stock ``Trace_ELBO`` on the literal chain (T model sites) for
    the MLP at ``sizes.literal_T`` only: it costs T network calls a step."""
    from pyrovae.infer.diffusion_elbo import DiffusionELBO

    for denoiser in sizes.denoisers:
        for T in sizes.diffusion_Ts:
            pyro.clear_param_store()
            chain = _chain(sizes, denoiser, T, device)
            x0 = _images(sizes.diffusion_batch, sizes, device)
            floor = TorchDDPM(chain)
            variants = {FLOOR: _bind(floor.train_step, fast_adam(chain, 1e-4), x0)}
            svi = SVI(chain.model, chain.guide_posterior, pyro.optim.Adam({"lr": 1e-4}), loss=DiffusionELBO())
            variants["pyrovae DiffusionELBO"] = _bind(svi.step, x0)
            variants[TRAINER] = _bind(trainer_step(chain, DiffusionELBO()), x0)
            if denoiser == "mlp" and T == sizes.literal_T:
                literal = SVI(
                    chain.model,
                    chain.guide_posterior,
                    pyro.optim.Adam({"lr": 1e-4}),
                    loss=Trace_ELBO(max_plate_nesting=1),
                )
                variants["Trace_ELBO literal chain"] = _bind(literal.step, x0)
            # the target is for the image denoisers, where the network's work dominates
            case = f"{denoiser} T={T} batch {sizes.diffusion_batch}"
            # a U-Net step takes most of a second on a CPU: fewer repeats
            repeats = sizes.slow_repeats if denoiser == "unet" else None
            yield Case(
                "diffusion",
                case,
                variants,
                {TRAINER: 1.10 if denoiser == "mlp" else 1.05},
                {"denoiser": denoiser, "T": T},
                repeats,
            )


def bound_cases(sizes: Sizes, device: torch.device, chunk_size: int = 512):
    """The full-T bound of a batch (every term, no gradients): ``full_bound``
    (batched over t) against the floor, the denoiser's forward passes alone
    over the same T x B inputs in the same chunks (inputs drawn beforehand).
    For the MLP at ``sizes.bound_T`` also the per-site literal chain under
    Pyro's ``TraceMeanField_ELBO`` and our ``TraceAnalyticKL_ELBO``
    (closed-form KL per site with the posterior-order guide); for the U-Net,
    where the network's work dominates, a shorter chain (``bound_T_unet``)."""
    for denoiser, T, B in (
        ("mlp", sizes.bound_T, sizes.bound_batch),
        ("unet", sizes.bound_T_unet, sizes.bound_batch_unet),
    ):
        pyro.clear_param_store()
        chain = _chain(sizes, denoiser, T, device)
        x0 = _images(B, sizes, device)
        per_call = max(1, chunk_size // B)
        with torch.no_grad():
            t = torch.arange(1, T + 1, device=device)[:, None].expand(T, B)
            x_t = chain.schedule.q_sample(x0.expand(T, B, chain.x_dim), t).reshape(T * B, chain.x_dim)
            tau = (t * (1000.0 / T)).to(x0.dtype).reshape(-1)
        chunks = [(x_t[i : i + per_call * B], tau[i : i + per_call * B]) for i in range(0, T * B, per_call * B)]
        variants = {
            FLOOR: _no_grad(_forwards, chain.net, chunks),
            "pyrovae full_bound (batched over t)": _no_grad(chain.full_bound, x0, chunk_size),
        }
        if denoiser == "mlp":
            variants["TraceMeanField_ELBO per-site chain"] = _no_grad(
                TraceMeanField_ELBO(max_plate_nesting=1).loss, chain.model, chain.guide_posterior, x0
            )
            variants["pyrovae TraceAnalyticKL_ELBO per-site chain"] = _no_grad(
                TraceAnalyticKL_ELBO(max_plate_nesting=1).loss, chain.model, chain.guide_posterior, x0
            )
        yield Case(
            "bound",
            f"{denoiser} T={T} batch {B}",
            variants,
            {"pyrovae full_bound (batched over t)": 1.2},
            {"denoiser": denoiser, "T": T},
            repeats=sizes.slow_repeats,
        )


def _forwards(net, chunks: list) -> None:
    for x, tau in chunks:
        net(x, tau)


def sample_cases(sizes: Sizes, device: torch.device):
    """Ancestral sampling with all T steps and strided sampling on
    ``sizes.sample_steps`` respaced steps: ``DiffusionChain.sample`` against a
    plain torch loop over the same steps (its respaced schedule computed once,
    beforehand); then :func:`sampler_cases` on the same chain."""
    pyro.clear_param_store()
    chain = _chain(sizes, "mlp", sizes.sample_T, device)
    n = sizes.sample_n
    yield Case(
        "sample",
        f"mlp ancestral T={chain.T} n={n}",
        {FLOOR: _bind(TorchDDPM(chain).sample, n), "pyrovae sample": _bind(chain.sample, n)},
        {"pyrovae sample": 1.05},
        repeats=sizes.slow_repeats,
    )
    strided = TorchDDPM(chain.respaced(sizes.sample_steps))
    variants = {
        FLOOR: _bind(strided.sample, n),
        f"pyrovae sample(steps={sizes.sample_steps})": _bind(chain.sample, n, sizes.sample_steps),
    }
    yield Case(
        "sample",
        f"mlp strided {sizes.sample_steps} of T={chain.T} n={n}",
        variants,
        {f"pyrovae sample(steps={sizes.sample_steps})": 1.1},
    )
    yield from sampler_cases(chain, sizes.sampler_steps, n, device)
    # the denoiser of the default image chain: its forward pass dwarfs a sampler's arithmetic
    unet = _chain(sizes, "unet", sizes.sample_T, device)
    yield from sampler_cases(unet, sizes.sampler_unet_steps, sizes.sampler_unet_n, device, "unet", sizes.slow_repeats)


def sampler_cases(
    chain, step_counts: tuple, n: int, device: torch.device, denoiser: str = "mlp", repeats: int | None = None
):
    """The samplers of :mod:`pyrovae.diffusion.samplers` (ancestral, DDIM with
    eta = 0, DPM-Solver++ 2M) drawing ``n`` samples of ``chain`` with K network calls, K in ``step_counts``,
    against the physical limit: the denoiser's K forward passes alone, on
    inputs drawn beforehand at the times the DDIM grid tells the network. A
    sampler's ratio minus one is its own work per step (grid, noise levels,
    x0_hat, the update; for ancestral also the chain's respacing and its
    decoder's mean at the last step) as a share of a step."""
    from pyrovae.diffusion.samplers import ChainView, sample

    view = ChainView(chain)
    tau_table = chain.tables(torch.get_default_dtype())["tau"]
    for steps in step_counts:
        times = [int(t) for t in view.grid(steps)[:-1]]
        inputs = [(torch.randn(n, chain.x_dim, device=device), tau_table[t - 1].expand(n).clone()) for t in times]
        variants = {FLOOR: _no_grad(_forwards, chain.net, inputs)}
        for name, sampler in (("ancestral", "ancestral"), ("DDIM eta 0", "ddim"), ("DPM-Solver++ 2M", "dpm-solver++")):
            variants[f"pyrovae {name}"] = _bind(sample, chain, n, steps, sampler)
        yield Case(
            "sample",
            f"{denoiser} samplers {steps} of T={chain.T} n={n}",
            variants,
            {name: 1.05 for name in variants if name != FLOOR},
            {"steps": steps, "denoiser": denoiser},
            repeats,
        )


# --- train: whole runs ------------------------------------------------------------------


def _run_config(sizes: Sizes, validate: bool, compile: bool = False):
    from pyrovae.config import VAEConfig

    hidden, z_dim = list(sizes.vae_hidden), sizes.vae_z_dim
    return VAEConfig(
        data=sizes.train_data,
        train_size=sizes.train_size,
        epochs=sizes.train_epochs,
        hidden=hidden,
        z_dim=z_dim,
        validate=validate,
        compile=compile,
        quiet=True,
        eval_every=sizes.train_epochs,
    )


def pyrovae_run(cfg) -> Timed:
    """``pyrovae train vae`` in a fresh temporary folder: its training seconds
    (metrics.csv's ``seconds``: the epochs' step loops, not the set-up,
    evaluation, checkpoints or figures)."""
    import dataclasses
    import shutil
    import tempfile

    from pyrovae.train import train

    out = tempfile.mkdtemp(prefix="pyrovae-bench-")
    validation = is_validation_enabled()  # train() sets it for its run; the bench's is off
    try:
        result = train(dataclasses.replace(cfg, out=os.path.join(out, "run")))
        return Timed(1000.0 * result.metrics[-1]["seconds"])
    finally:
        pyro.enable_validation(validation)
        shutil.rmtree(out, ignore_errors=True)


def train_cases(sizes: Sizes, device: torch.device):
    """A whole default ``pyrovae train vae`` run (``sizes.train_epochs`` epochs of
    ``sizes.train_data``) with ``--no-validate``, with validation on and with
    ``--compile`` (its training seconds include the captures and compiles,
    one per batch shape), against the plain torch loop; CPU only (the run
    picks its device from its config)."""
    fast, checked, compiled = (
        _run_config(sizes, False),
        _run_config(sizes, True),
        _run_config(sizes, False, compile=True),
    )
    variants = {
        FLOOR: _bind(torch_run, fast),
        RUN_NO_VALIDATE: _bind(pyrovae_run, fast),
        RUN_VALIDATE: _bind(pyrovae_run, checked),
        RUN_COMPILED: _bind(pyrovae_run, compiled),
    }
    name = f"vae {sizes.train_data} {sizes.train_epochs} epochs"
    yield Case(
        "train",
        name,
        variants,
        {RUN_NO_VALIDATE: 1.15},
        {"data": sizes.train_data, "epochs": sizes.train_epochs},
        repeats=sizes.train_repeats,
    )


# --- ddp: two processes against one --------------------------------------------------------


def _ddp_model(sizes: Sizes, name: str):
    """``(model, objective, global batch)`` of a ddp case, built the same way
    (same seed) in every process: the default VAE or the U-Net diffusion chain."""
    from pyrovae.infer.diffusion_elbo import DiffusionELBO

    torch.manual_seed(0)
    if name == "vae":
        x_dim = math.prod(sizes.image_shape)
        model = build_vae(x_dim, sizes.vae_z_dim, sizes.vae_hidden)
        return (
            model,
            TraceAnalyticKL_ELBO(max_plate_nesting=1),
            torch.bernoulli(torch.full((sizes.ddp_vae_batch, x_dim), 0.3)),
        )
    chain = _chain(sizes, "unet", sizes.ddp_unet_T, torch.device("cpu"))
    return chain, DiffusionELBO(), _images(sizes.ddp_unet_batch, sizes, torch.device("cpu"))


def _one_process_steps(sizes: Sizes, name: str) -> Callable:
    """The floor of a ddp case: the same trainer step in this process (one
    thread, the run's), no process group, on the whole global batch."""
    model, objective, batch = _ddp_model(sizes, name)
    step = trainer_step(model, objective)
    steps = sizes.ddp_vae_steps if name == "vae" else sizes.ddp_unet_steps

    def call() -> Timed:
        start = time.perf_counter()
        for _ in range(steps):
            step(batch)
        return Timed(1000.0 * (time.perf_counter() - start) / steps)

    return call


def ddp_cases(sizes: Sizes, device: torch.device):
    """The trainer's step on ``sizes.ddp_processes`` gloo processes (one torch
    thread each, DDP around the loss module) against one process with one
    thread, on the same global batch: the default VAE and the U-Net diffusion
    step. Also the processes without the gradients' all-reduce (DDP's
    ``no_sync``): the difference is what the communication costs. CPU only."""
    if device.type != "cpu":
        return
    group = ProcessGroup(sizes, sizes.ddp_processes, _ddp_model)
    try:
        for name in ("vae", "unet"):
            batch = sizes.ddp_vae_batch if name == "vae" else sizes.ddp_unet_batch
            steps = sizes.ddp_vae_steps if name == "vae" else sizes.ddp_unet_steps
            variants = {
                FLOOR: _one_process_steps(sizes, name),
                DDP: _bind(group.steps, name, steps, True),
                DDP_NO_SYNC: _bind(group.steps, name, steps, False),
            }
            label = "vae" if name == "vae" else f"unet T={sizes.ddp_unet_T}"
            params = {"model": name, "batch": batch, "processes": sizes.ddp_processes}
            yield Case(
                "ddp",
                f"{label} batch {batch}",
                variants,
                {},
                params,
                repeats=sizes.slow_repeats if name == "unet" else None,
            )
    finally:
        group.close()


CASES = {
    "vae": vae_cases,
    "diffusion": diffusion_cases,
    "bound": bound_cases,
    "sample": sample_cases,
    "train": train_cases,
    "ddp": ddp_cases,
    "m2": m2_cases,
    "conditional": conditional_cases,
}
