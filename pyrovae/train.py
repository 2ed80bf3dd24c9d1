"""The training loop: a config dataclass and a plain, visible SVI loop.

``train(TrainConfig(model="vae", ...))`` is what ``pyrovae train vae`` runs:
load data, build the model, then per epoch one pass of SVI steps over the
training set, the test ELBO every ``eval_every`` epochs, and a checkpoint;
at the end the figures. The run folder holds::

    config.json  metrics.csv  model.pt  checkpoint.pt
    loss.png  samples.png  reconstructions.png

One SVI step (:func:`svi_step`) is Pyro's ``SVI.step`` written out, so that
the loop can sum gradients over processes and clip their global norm between
the ELBO's ``loss_and_grads`` and the ``pyro.optim`` step. The same loop runs
under ``torchrun --nproc_per_node=N -m pyrovae train ...`` (see
:mod:`pyrovae.distributed`); rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import time
from dataclasses import dataclass

import pyro
import pyro.optim
import torch
from pyro import poutine
from pyro.infer.util import zero_grads
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset
from tqdm.auto import tqdm

from pyrovae import checkpoint
from pyrovae import data as datasets
from pyrovae import distributed, plots, runs
from pyrovae.checkpoint import atomic_torch_save, atomic_write_bytes
from pyrovae.device import resolve_device
from pyrovae.config import MODELS, RESUMABLE_FIELDS, TrainConfig, data_kind, resolve
from pyrovae.optim import OPTIMIZERS, lr_factor


RECIPES = {name: m.recipe for name, m in MODELS.items()}


@dataclass
class TrainResult:
    model: torch.nn.Module
    config: TrainConfig
    metrics: list  # one row per evaluation; empty on ranks other than 0
    out_dir: str


class EMA:
    """Exponential moving average of a module's floating-point state:

        theta_ema <- d_k theta_ema + (1 - d_k) theta,   d_k = min(decay, (1 + k) / (10 + k))

    after optimiser step k. The ramp (1 + k) / (10 + k) lets the average
    forget the random initial weights in short runs (as TensorFlow's
    ``ExponentialMovingAverage(num_updates=k)`` does). Integer buffers are copied.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v, 1 - d)
            else:
                self.shadow[k].copy_(v)

    @contextlib.contextmanager
    def applied(self, module: torch.nn.Module):
        """Inside the block ``module`` holds the EMA weights (copied in place,
        so Pyro's param store sees them too); afterwards its own again."""
        own = {k: v.clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.shadow)
        try:
            yield module
        finally:
            module.load_state_dict(own)


def make_optim(cfg: TrainConfig, steps_per_epoch: int) -> pyro.optim.PyroLRScheduler:
    """``cfg.optimizer`` under Pyro's ``LambdaLR`` wrapper, stepped once per
    optimiser step: lr_k = lr * warmup(k) * schedule(k), with warmup(k) =
    min(1, (k + 1) / warmup_steps), and schedule(k) = 1 (constant),
    (1 + cos(pi k / K)) / 2 over the run's K steps (cosine), or
    lr_gamma ** (k / steps_per_epoch) (exponential)."""

    def lr_lambda(k: int) -> float:
        return lr_factor(k, steps_per_epoch, cfg.epochs, cfg.lr_schedule, cfg.warmup_steps, cfg.lr_gamma)

    return pyro.optim.LambdaLR({"optimizer": OPTIMIZERS[cfg.optimizer], "optim_args": {"lr": cfg.lr}, "lr_lambda": lr_lambda})


def current_lr(optim: pyro.optim.PyroLRScheduler) -> float:
    schedulers = list(optim.optim_objs.values())
    return schedulers[0].get_last_lr()[0] if schedulers else float("nan")


class NonFiniteLossError(FloatingPointError):
    """A training step whose loss or gradient is NaN or inf; raised before the
    optimiser step, so the weights are still those of the last good step."""


def nonfinite_terms(model, batch: torch.Tensor) -> list[str]:
    """The ELBO's terms that are not finite on ``batch``, re-evaluated on one
    draw: for each sample site, log q (guide) and log p (model) as
    ``"log q at 'z'"``; in a VAE ``'x'`` is the reconstruction term and ``'z'``
    the KL term."""
    # Without validation: the distributions must take the bad values to say where they are.
    with torch.no_grad(), pyro.validation_enabled(False):
        guide_trace = poutine.trace(model.guide).get_trace(batch)
        model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(batch)
    bad = []
    for label, trace in (("log p", model_trace), ("log q", guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and not torch.isfinite(site["fn"].log_prob(site["value"])).all():
                bad.append(f"{label} at {name!r}")
    return bad


def svi_step(objective, model, optim, batch: torch.Tensor, grad_clip: float | None = None, precision: str = "fp32") -> float:
    """One SVI step on the global batch; returns its loss (-ELBO, summed over examples).

    As ``pyro.infer.SVI.step``: the objective's ``loss_and_grads`` on this
    process's shard of the batch, recording which params the model and guide
    touch; then the gradients summed over processes, the global gradient norm
    clipped to ``grad_clip``, the ``pyro.optim`` step, and zeroed gradients.
    A NaN or inf in the loss or any gradient (or, under validation, in a
    distribution's parameters) raises :class:`NonFiniteLossError`
    instead of the optimiser step (the check is after the reduction, so every
    process decides alike).
    """
    use_bf16 = precision == "bf16"
    with poutine.trace(param_only=True) as param_capture, torch.autocast(batch.device.type, torch.bfloat16, enabled=use_bf16):
        try:
            loss = objective.loss_and_grads(model.model, model.guide, batch)
        except ValueError as err:
            # Under validation a NaN/inf from the networks surfaces as a distribution's
            # invalid parameter (torch's argument check) before any loss exists.
            if not str(err).startswith("Expected parameter"):
                raise
            raise NonFiniteLossError(str(err).splitlines()[0]) from err
    # Sorted by name: every process must reduce the gradients in the same order.
    sites = sorted(param_capture.trace.nodes.items())
    params = [site["value"].unconstrained() for _, site in sites]
    loss = distributed.all_reduce_grads(params, float(loss))
    grads = [p.grad for p in params if p.grad is not None]
    if not (math.isfinite(loss) and (not grads or torch.stack([g.isfinite().all() for g in grads]).all())):
        zero_grads(set(params))
        raise NonFiniteLossError(f"the loss is {loss}" if not math.isfinite(loss) else f"the loss is {loss:.6g} but a gradient is NaN or inf")
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optim(params)
    zero_grads(set(params))
    return loss


def make_shard_loader(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> tuple[DataLoader, DistributedSampler]:
    """Batches of this process's shard: with W processes, rank r's k-th batch
    holds examples r, r+W, r+2W, ... of the k-th global batch of ``cfg.batch_size``
    (a ``DistributedSampler`` over the seeded permutation of epoch e, so the
    order depends on (seed, epoch) only and a resumed run sees the same batches)."""
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of the number of processes ({world})")
    ds = TensorDataset(x, y)
    sampler = DistributedSampler(ds, num_replicas=world, rank=distributed.rank(), shuffle=True, seed=cfg.seed)
    return DataLoader(ds, sampler=BatchSampler(sampler, cfg.batch_size // world, drop_last=False), batch_size=None), sampler


def run_dir(cfg: TrainConfig) -> str:
    """``cfg.out``; by default the resumed run's folder, or a new
    ``runs/<model>-<data>-<timestamp>``."""
    if cfg.out is None and cfg.resume is not None:
        return os.path.dirname(checkpoint.checkpoint_path(cfg.resume))
    return cfg.out or os.path.join("runs", f"{cfg.model}-{cfg.data}-{time.strftime('%Y%m%d-%H%M%S')}")


def write_metrics_csv(path: str, rows: list) -> None:
    """All rows so far, rewritten atomically after each evaluation (floats as
    ``repr``, so reading them back gives the same numbers)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, lambda f: f.write(text.getvalue().encode()))


def resume_state(cfg: TrainConfig) -> dict | None:
    """The checkpoint ``cfg.resume`` names, checked against ``cfg``: a field
    that changes the model or the maths (not one of ``RESUMABLE_FIELDS``) must
    be equal, else a ``ValueError`` lists each mismatch."""
    if cfg.resume is None:
        return None
    ckpt = checkpoint.load_checkpoint(cfg.resume)
    saved = dataclasses.asdict(resolve(TrainConfig.from_dict(ckpt["config"])))
    mismatches = checkpoint.config_mismatches(saved, dataclasses.asdict(cfg), ignore=RESUMABLE_FIELDS)
    if mismatches:
        raise ValueError(f"cannot resume from {cfg.resume!r}: its config does not match the requested one: " + "; ".join(mismatches))
    if cfg.epochs <= ckpt["epoch"]:
        raise ValueError(f"epochs must be > {ckpt['epoch']} (the checkpoint's epoch) to resume, got {cfg.epochs}")
    if len(ckpt["rng"]) != distributed.world_size():
        raise ValueError(f"the checkpoint was written by {len(ckpt['rng'])} processes; resume it with as many, not {distributed.world_size()}")
    return ckpt


def tensorboard_writer():
    """TensorBoard's ``SummaryWriter`` class, imported before the run writes anything."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError("tensorboard=True needs the tensorboard package (pip install tensorboard)") from err
    return SummaryWriter


def train(cfg: TrainConfig) -> TrainResult:
    """Train the model ``cfg.model`` names by SVI; write the run's files; return it.

    The config's ``"auto"`` fields are resolved for the data first
    (:func:`pyrovae.config.resolve`): ``TrainResult.config`` and ``config.json``
    hold the values used.

    The loop is the same for every model: a *recipe* (``RECIPES[cfg.model]``)
    says how to build the model/guide pair and its objective, how to prepare a
    batch, what to evaluate and which figures to draw.
    """
    cfg = resolve(cfg).check()
    recipe = RECIPES[cfg.model]
    device, started_group = distributed.init_from_env(resolve_device(cfg.device))
    try:
        cfg = dataclasses.replace(cfg, out=run_dir(cfg))
        with runs.open_run(cfg.out, cfg.resume, cfg.overwrite) as run:
            return _train(cfg, recipe, device, run)
    finally:
        distributed.shutdown(started_group)


def _train(cfg: TrainConfig, recipe, device: torch.device, run: runs.RunFolder) -> TrainResult:
    ckpt = resume_state(cfg)
    is_main = distributed.rank() == 0
    out = cfg.out
    quiet = cfg.quiet or not is_main
    log = (lambda text: None) if quiet else tqdm.write  # keeps the bars intact
    pyro.clear_param_store()
    pyro.set_rng_seed(cfg.seed)
    pyro.enable_validation(cfg.validate)
    log(f"pyrovae train {cfg.model}, writing to {out}\n{cfg.to_json()}")

    ds = datasets.load_dataset(cfg.data, cfg.data_dir).subset(cfg.train_size, cfg.test_size).to(device)
    if hasattr(recipe, "check_data"):
        recipe.check_data(cfg, ds.x_train)
    x_test = recipe.prepare_test(cfg, ds.x_test)
    loader, sampler = make_shard_loader(ds.x_train, ds.y_train, cfg)
    model = recipe.build(cfg, ds).to(device)
    distributed.broadcast_module(model)
    objective = recipe.objective(cfg)
    optim = make_optim(cfg, len(loader))
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    metrics, epoch0, step, seconds, skipped = [], 0, 0, 0.0, 0
    if ckpt is not None:
        checkpoint.load_model_state(model, ckpt["model"], cfg.resume)
        optim.set_state(ckpt["optim"])
        if ema is not None:
            ema.shadow = {k: v.to(device) for k, v in ckpt["ema"].items()}
        metrics, epoch0, step, seconds = ckpt["metrics"], ckpt["epoch"], ckpt["step"], ckpt["seconds"]
        skipped = ckpt.get("skipped", 0)  # absent in checkpoints from before --nan-policy
        checkpoint.set_rng_state(ckpt["rng"][distributed.rank()])
    else:
        # Equal initial weights on every rank, different sampling noise.
        pyro.set_rng_seed(cfg.seed + distributed.rank())
    summary_writer = tensorboard_writer() if cfg.tensorboard and is_main else None
    # Every check has passed: only now is anything but the lock written.
    if is_main:
        run.start()
        atomic_write_bytes(os.path.join(out, "config.json"), lambda f: f.write(cfg.to_json().encode()))
    writer = summary_writer(out) if summary_writer is not None else None
    with_ema = (lambda: ema.applied(model)) if ema is not None else contextlib.nullcontext

    # disable=None: no bars when stderr is not a terminal (logs get the per-epoch lines only).
    epochs = tqdm(range(epoch0 + 1, cfg.epochs + 1), desc="epochs", initial=epoch0, total=cfg.epochs, disable=quiet or None)
    run.catch_interrupts()
    for epoch in epochs:
        t0 = time.perf_counter()
        if hasattr(recipe, "on_epoch_start"):
            recipe.on_epoch_start(cfg, epoch, objective)
        sampler.set_epoch(epoch)
        model.train()
        total = 0.0
        steps = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=quiet or None)
        for i, (xb, _) in enumerate(steps, start=1):
            batch = recipe.prepare_batch(cfg, xb)
            try:
                loss = svi_step(objective, model, optim, batch, cfg.grad_clip, cfg.precision)
            except NonFiniteLossError as err:
                if cfg.nan_policy == "skip":
                    skipped += 1
                    log(f"step {step + 1} (epoch {epoch}) skipped: {err}")
                    continue
                raise nonfinite_stop(err, model, batch, step + 1, epoch, out) from err
            optim.step()  # the lr schedule
            step += 1
            if ema is not None:
                ema.update(model, step)
            total += loss
            steps.set_postfix(loss=f"{total / (i * cfg.batch_size):.2f}", lr=f"{current_lr(optim):.2e}")  # running -ELBO per example
            if run.stop_requested():  # Ctrl-C: the last epoch's checkpoint stays the one to resume
                raise run.interrupted(cfg.model, step, epoch)
        seconds += time.perf_counter() - t0

        if is_main and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            model.eval()
            with with_ema():
                test = recipe.evaluate(cfg, model, x_test)
            row = {"epoch": epoch, "step": step, "train_elbo": -total / len(ds.x_train), **test, "lr": current_lr(optim), "seconds": seconds, "skipped_steps": skipped}
            metrics.append(row)
            write_metrics_csv(os.path.join(out, "metrics.csv"), metrics)
            if writer is not None:
                for k, v in row.items():
                    writer.add_scalar(k, v, step)
            epochs.set_postfix(test_elbo=f"{row['test_elbo']:.2f}")
            log(f"epoch {epoch}: " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "step")))
        # Every rank's generator state, so that a resumed run continues each stream.
        rngs = distributed.all_gather(checkpoint.rng_state())
        if is_main:
            state = {
                "format": checkpoint.CHECKPOINT_FORMAT,
                "config": dataclasses.asdict(cfg),
                "epoch": epoch,
                "step": step,
                "model": dict(model.state_dict()),
                "ema": ema.shadow if ema is not None else None,
                "optim": optim.get_state(),
                "rng": rngs,
                "metrics": metrics,
                "seconds": seconds,
                "skipped": skipped,
            }
            atomic_torch_save(state, os.path.join(out, checkpoint.CHECKPOINT))

    if writer is not None:
        writer.close()
    if is_main:
        atomic_torch_save(dict(model.state_dict()), os.path.join(out, "model.pt"))
        write_figures(out, cfg, recipe, model, ds, x_test, metrics, with_ema)
    distributed.barrier()
    return TrainResult(model, cfg, metrics, out)


def nonfinite_stop(err: NonFiniteLossError, model, batch, step: int, epoch: int, out: str) -> NonFiniteLossError:
    """The error that stops a run at a non-finite step: which step, which ELBO
    terms went bad, and the checkpoint left (the one of the last finished epoch)."""
    terms = ", ".join(nonfinite_terms(model, batch)) or "none on re-evaluation (a gradient or an unlucky draw)"
    path = os.path.join(out, checkpoint.CHECKPOINT)
    kept = f"the last good checkpoint {path} (epoch {epoch - 1}) is kept; continue with --resume" if epoch > 1 else "no epoch had finished, so there is no checkpoint"
    return NonFiniteLossError(
        f"non-finite training loss at step {step} (epoch {epoch}): {err}; ELBO terms not finite on this batch: {terms}. "
        f"Stopped: {kept}, or pass --nan-policy skip to skip such steps"
    )


def write_figures(out: str, cfg: TrainConfig, recipe, model, ds, x_test, metrics: list, with_ema) -> None:
    """The ELBO curves (every metric but epoch, step, lr and seconds) and the
    recipe's figures, drawn with the EMA weights when there are any."""
    curves = {k: [m[k] for m in metrics] for k in metrics[0] if k not in ("epoch", "step", "lr", "seconds", "skipped_steps")}
    plots.plot_curves(os.path.join(out, "loss.png"), [m["epoch"] for m in metrics], curves, "epoch", recipe.elbo_unit, f"{cfg.model} on {ds.name}")
    model.eval()
    with with_ema():
        recipe.write_figures(out, cfg, model, ds, x_test)
