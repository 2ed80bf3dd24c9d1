"""The training loop: the plain torch loop of examples/svi_torch.py, shared by every model.

``train(TrainConfig(model="vae", ...))`` is what ``pyrovae train vae`` runs:
load data, build the model, then per epoch one pass of optimiser steps over
the training set, the test ELBO every ``eval_every`` epochs, and a checkpoint;
at the end the figures. The run folder holds::

    config.json  metrics.csv  model.pt  checkpoint.pt
    loss.png  samples.png  reconstructions.png

One step (:func:`train_step`) is about twenty lines of torch: the
objective's ``differentiable_loss`` of the batch through :class:`LossModule`
(the model module wrapped so that its ``forward`` is the loss, as the
optimiser and ``DistributedDataParallel`` need), ``backward``,
``clip_grad_norm_`` (its norm is logged in metrics.csv as ``grad_norm``), a
check that nothing is NaN or inf, one torch optimiser step over all of the
model's parameters, one ``LambdaLR`` step, the EMA update
(``torch.optim.swa_utils.AveragedModel``). The same loop runs under
``torchrun --nproc_per_node=N -m pyrovae train ...`` (see
:mod:`pyrovae.distributed`); rank 0 alone writes files. With ``--compile``
the loss module is :func:`pyrovae.compiled.compile_loss`'s (the loss captured
once per batch shape and compiled), inside DDP as the eager one is.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import math
import os
import re
import time
import warnings
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from tqdm.auto import tqdm

from pyrovae import checkpoint, distributed, params, plots, runs
from pyrovae import data as datasets
from pyrovae.checkpoint import atomic_torch_save, atomic_write_bytes
from pyrovae.compiled import compile_loss
from pyrovae.config import RESUMABLE_FIELDS, TrainConfig, resolve
from pyrovae.device import resolve_device
from pyrovae.early_stopping import EarlyStopping, held_out_size
from pyrovae.infer.bound import metric_unit
from pyrovae.optim import OPTIMIZERS, make_optimizer, make_scheduler  # noqa: F401 (OPTIMIZERS: pyrovae.lightning)
from pyrovae.recipes import MODELS, recipe_for

RECIPES = {name: m.recipe for name, m in MODELS.items()}
__all__ = ["TrainConfig", "TrainResult", "LossModule", "train", "train_step", "make_averaged_model"]


@dataclass
class TrainResult:
    model: torch.nn.Module  # the trained weights
    config: TrainConfig  # as resolved for the data (pyrovae.config.resolve)
    metrics: list  # one row per evaluation; empty on ranks other than 0
    out_dir: str
    ema_model: torch.nn.Module | None = None  # the averaged weights (cfg.ema_decay), evaluated and sampled with
    best_epoch: int | None = None  # with early stopping: the epoch whose weights model and ema_model hold (rank 0)


class LossModule(torch.nn.Module):
    """The objective's loss of a batch as a module over the model's parameters:
    ``forward(batch) = objective.differentiable_loss(model.model, model.guide, batch)``
    (-ELBO summed over the batch, or the objective's loss).

    ``ELBO(model.model, model.guide)`` would give Pyro's ``ELBOModule``, which
    has no parameters (bound methods are not submodules); holding the model
    module itself gives the optimiser and ``DistributedDataParallel`` its
    parameters. Model and guide run without registering in the param store
    (:func:`pyrovae.params.unregistered`): the gradients go to the modules'
    own parameters directly.
    """

    def __init__(self, model: torch.nn.Module, objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        with params.unregistered():
            return self.objective.differentiable_loss(self.model.model, self.model.guide, batch)


def ema_multi_avg_fn(decay: float):
    """The ``multi_avg_fn`` of :func:`make_averaged_model`: at the k-th update
    (k >= 2; the first copies the weights)

        theta_ema <- d_k theta_ema + (1 - d_k) theta,   d_k = min(decay, (1 + k) / (10 + k)),

    the ramp letting the average forget the first weights in short runs (as
    TensorFlow's ``ExponentialMovingAverage(num_updates=k)`` does)."""

    @torch.no_grad()
    def update(averaged: list, current: list, n_averaged: torch.Tensor) -> None:
        k = int(n_averaged) + 1
        torch._foreach_lerp_(averaged, current, 1 - min(decay, (1 + k) / (10 + k)))

    return update


def make_averaged_model(model: torch.nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of ``model``'s parameters (buffers follow
    the model), updated by ``update_parameters(model)`` after each optimiser
    step; ``None`` without a decay. Its ``.module`` is a model of its own,
    evaluated and sampled with: no weights are swapped in and out of the live model."""
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(decay))


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


def train_step(
    loss_fn,
    parameters: list,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    grad_clip: float | None = None,
    precision: str = "fp32",
) -> tuple[float, float]:
    """One optimiser step on the global batch; returns its loss (summed over
    the global batch's examples) and the global gradient norm before clipping.

    ``loss_fn(batch)`` is this process's loss (a :class:`LossModule`, or it
    wrapped in ``DistributedDataParallel``). DDP *averages* gradients over the
    W processes while the loss is a sum over examples, so the backward pass
    takes W times the local loss: the averaged gradient is then the gradient
    of the global batch's loss, and W processes take the step one process
    takes on the global batch. A NaN or inf in the loss or the gradient norm
    (or, under validation, in a distribution's parameters) raises
    :class:`NonFiniteLossError` instead of the optimiser step; both are
    reduced over processes first, so every process decides alike.
    """
    optimizer.zero_grad(set_to_none=True)
    # (an autocast context costs a few microseconds even when disabled: entered for bf16 only)
    with torch.autocast(batch.device.type, torch.bfloat16) if precision == "bf16" else contextlib.nullcontext():
        try:
            loss = loss_fn(batch)
        except ValueError as err:
            # Under validation a NaN/inf from the networks surfaces as a distribution's
            # invalid parameter (torch's argument check) before any loss exists.
            if not str(err).startswith("Expected parameter"):
                raise
            raise NonFiniteLossError(str(err).splitlines()[0]) from err
    world = distributed.world_size()
    (loss * world if world > 1 else loss).backward()
    if grad_clip is None:
        norm = _total_norm([p.grad for p in parameters if p.grad is not None])
    else:
        norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip, foreach=True)
    if world == 1 and batch.device.type == "cpu":
        # no device to sync with and nothing to reduce: two reads, no stacking
        loss_value, norm_value = loss.item(), norm.item()
    else:
        # One sync for both numbers; float64 so that a large batch's summed loss keeps its digits.
        loss_value, norm_value = distributed.all_reduce_sum(
            torch.stack([loss.detach().double(), norm.double() / world])
        ).tolist()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            f"the loss is {loss_value}"
            if not math.isfinite(loss_value)
            else f"the loss is {loss_value:.6g} but a gradient is NaN or inf"
        )
    optimizer.step()
    return loss_value, norm_value


def _total_norm(grads: list) -> torch.Tensor:
    """The 2-norm of all ``grads`` together, as ``torch.nn.utils.get_total_norm``
    computes it (one ``_foreach_norm``, then the norm of the norms), without its
    grouping by device and dtype when there is one device and one dtype (the
    usual model: one fewer pass of Python over the parameters each step)."""
    if not grads:
        return torch.tensor(0.0)
    first = grads[0]
    if all(
        g.device == first.device and g.dtype == first.dtype for g in grads
    ) and torch.utils._foreach_utils._device_has_foreach_support(first.device):
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    return torch.nn.utils.get_total_norm(grads, foreach=True)


def make_shard_loader(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> tuple[DataLoader, DistributedSampler]:
    """Batches of this process's shard: with W processes, rank r's k-th batch
    holds examples r, r+W, r+2W, ... of the k-th global batch of ``cfg.batch_size``
    (a ``DistributedSampler`` over the seeded permutation of epoch e, so the
    order depends on (seed, epoch) only and a resumed run sees the same batches)."""
    world = distributed.world_size()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size ({cfg.batch_size}) must be a multiple of the number of processes ({world})")
    ds = datasets.example_dataset(x, y)
    sampler = DistributedSampler(ds, num_replicas=world, rank=distributed.rank(), shuffle=True, seed=cfg.seed)
    batches = BatchSampler(sampler, cfg.batch_size // world, drop_last=False)
    # Its own generator: the base seed a DataLoader draws per iterator would otherwise
    # come from the global stream, and how often it draws depends on num_workers.
    loader = DataLoader(
        ds,
        sampler=batches,
        batch_size=None,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return loader, sampler


def run_dir(cfg: TrainConfig) -> str:
    """``cfg.out``; by default the resumed run's folder, or a new
    ``runs/<model>-<data>-<timestamp>-<pid>``: the process id keeps apart runs
    started in the same second (a seed sweep with ``&``), a counter (``-2``,
    ``-3``, ...) the runs of one process."""
    if cfg.out is None and cfg.resume is not None:
        return os.path.dirname(checkpoint.checkpoint_path(cfg.resume))
    if cfg.out:
        return cfg.out
    base = os.path.join(
        "runs", f"{cfg.model}-{datasets.source_label(cfg.data)}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    )
    path, n = base, 1
    while os.path.exists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def metrics_csv_text(rows: list) -> str:
    """metrics.csv's text for ``rows`` (floats as ``repr``, so reading them back
    gives the same numbers; a column a row lacks is left empty)."""
    text = io.StringIO()
    # Every column any row has, in order of appearance: rows of a resumed older run lack the newer ones.
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def write_metrics_csv(path: str, rows: list) -> None:
    """All rows so far, rewritten atomically after each evaluation (:func:`metrics_csv_text`)."""
    text = metrics_csv_text(rows)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def keep_edited_metrics(folder: str, rows: list) -> None:
    """A resume rewrites ``folder/metrics.csv`` from its checkpoint's rows: a
    hand edit of it (a column added, a row changed) is moved aside to
    ``metrics-edited.csv`` first, and said. Rows written after the checkpoint
    (a run killed between the two writes) are not an edit."""
    path = os.path.join(folder, "metrics.csv")
    try:
        with open(path) as f:
            found = f.read()
    except (FileNotFoundError, UnicodeDecodeError):
        return
    expected = metrics_csv_text(rows)
    if found.startswith(expected):
        return
    n, target = 1, os.path.join(folder, "metrics-edited.csv")
    while os.path.exists(target):
        n += 1
        target = os.path.join(folder, f"metrics-edited-{n}.csv")
    os.replace(path, target)
    warnings.warn(
        f"{path} differs from the rows its checkpoint holds, from which a resume rewrites it: the edited file is "
        f"kept as {target}",
        UserWarning,
        stacklevel=3,
    )


def resume_state(cfg: TrainConfig) -> dict | None:
    """The checkpoint ``cfg.resume`` names, checked against ``cfg``: a field
    that changes the model or the maths (not one of ``RESUMABLE_FIELDS``) must
    be equal, else a ``ValueError`` lists each mismatch."""
    if cfg.resume is None:
        return None
    ckpt = checkpoint.load_checkpoint(cfg.resume)
    folder = os.path.dirname(checkpoint.checkpoint_path(cfg.resume))
    here = os.path.realpath(folder) == os.path.realpath(cfg.out)
    kept = runs.edited_config_path(folder) if here else None
    # a hand edit is named, never applied, and (resuming in its folder) kept beside the config.json written anew
    edited = distributed.rank() == 0 and runs.warn_config_edits(folder, ckpt["config"], "the resumed run", kept)
    ckpt["config_edited"] = bool(edited) and here
    saved = resolve(TrainConfig.from_dict(ckpt["config"])).to_dict()
    mismatches = checkpoint.config_mismatches(saved, cfg.to_dict(), ignore=RESUMABLE_FIELDS)
    if mismatches:
        raise ValueError(
            f"cannot resume from {cfg.resume!r}: its config does not match the requested one: " + "; ".join(mismatches)
        )
    if cfg.epochs <= ckpt["epoch"]:
        raise ValueError(f"epochs must be > {ckpt['epoch']} (the checkpoint's epoch) to resume, got {cfg.epochs}")
    if len(ckpt["rng"]) != distributed.world_size():
        raise ValueError(
            f"the checkpoint was written by {len(ckpt['rng'])} processes; "
            f"resume it with as many, not {distributed.world_size()}"
        )
    return ckpt


def tensorboard_writer():
    """TensorBoard's ``SummaryWriter`` class, imported before the run writes anything."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError("tensorboard=True needs the tensorboard package (pip install tensorboard)") from err
    return SummaryWriter


def train(cfg: TrainConfig) -> TrainResult:
    """Train the model ``cfg.model`` names; write the run's files; return it.

    The config's ``"auto"`` fields are resolved for the data first
    (:func:`pyrovae.config.resolve`): ``TrainResult.config`` and ``config.json``
    hold the values used. The loop is the same for every model: a *recipe*
    (``pyrovae.recipes.MODELS[cfg.model].recipe``) says how to build the model/guide pair and
    its objective, how to prepare a batch, what to evaluate and which figures
    to draw.
    """
    if not isinstance(cfg, TrainConfig):
        raise TypeError(
            f"train takes a TrainConfig, e.g. train(TrainConfig(model='vae', epochs=2)), got {type(cfg).__name__}"
        )
    cfg = resolve(cfg).check()
    recipe = recipe_for(cfg)
    device, started_group = distributed.init_from_env(resolve_device(cfg.device))
    try:
        # rank 0's choice: the default name holds its process id
        cfg = dataclasses.replace(cfg, out=distributed.all_gather(run_dir(cfg))[0])
        with runs.open_run(cfg.out, cfg.resume, cfg.overwrite) as run, notes_in_log(cfg):
            return _train(cfg, recipe, device, run)
    finally:
        distributed.shutdown(started_group)


# Warnings that are notes about the run, not faults: said once, in the log, and not under --quiet.
LOGGED_WARNINGS = ("TraceAnalyticKL_ELBO: the closed-form KL would be biased",)


@contextlib.contextmanager
def notes_in_log(cfg: TrainConfig):
    """Route the warnings of :data:`LOGGED_WARNINGS` raised during the run to
    its log, each text once (the training objective and the evaluation's each
    warn); other warnings go where they went."""
    quiet = cfg.quiet or distributed.rank() != 0
    seen = set()
    with warnings.catch_warnings():
        show = warnings.showwarning

        def showwarning(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if not text.startswith(LOGGED_WARNINGS):
                return show(message, category, filename, lineno, file, line)
            if text not in seen and not quiet:
                tqdm.write(f"note: {text}")
            seen.add(text)

        warnings.showwarning = showwarning
        for prefix in LOGGED_WARNINGS:  # every time: the dedup is ours, by text
            warnings.filterwarnings("always", message=re.escape(prefix))
        yield


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

    ds = datasets.load_from_config(cfg).subset(cfg.train_size, cfg.test_size).to(device)
    # Rows kept on disk are not all read up front: their (same-source) test split stands for them.
    recipe.check_data(cfg, ds.x_test if ds.lazy else ds.x_train)
    x_test = recipe.prepare_test(cfg, ds.x_test)
    early = None
    n_held_out = held_out_size(cfg, len(ds.x_train))
    if n_held_out is not None:
        ds, x_held_out, y_held_out = ds.hold_out(n_held_out, cfg.seed)
        x_held_out = recipe.prepare_test(cfg, x_held_out.to(device))
        # M2: its held-out bound and accuracy take x with its labels
        x_held_out = recipe.with_labels(cfg, x_held_out, y_held_out)
        early = EarlyStopping(cfg.early_stopping, x_held_out, cfg.seed, getattr(cfg, "kl_warmup", 0), recipe.select_by)
    ds = recipe.prepare_data(cfg, ds)  # M2: the labels it keeps (none of them held out)
    x_test = recipe.with_labels(cfg, x_test, ds.y_test)
    loader, sampler = make_shard_loader(ds.x_train, ds.y_train, cfg)
    model = recipe.build(cfg, ds).to(device)
    objective = recipe.objective(cfg)
    # DDP (under torchrun) copies rank 0's weights to every process when it wraps the module.
    wrap = functools.partial(distributed.wrap, device=device)
    loss_fn = LossModule(model, objective)
    loss_fn = compile_loss(loss_fn, wrap=wrap) if cfg.compile else wrap(loss_fn)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, parameters, cfg.lr)
    scheduler = make_scheduler(optimizer, cfg, len(loader))
    averaged = make_averaged_model(model, cfg.ema_decay)
    metrics, epoch0, step, seconds, skipped = [], 0, 0, 0.0, 0
    history = []  # the training objective after every epoch, evaluated or not (loss.png)
    if ckpt is not None:
        history = list(ckpt.get("history", []))
        checkpoint.restore(ckpt, cfg.resume, model, optimizer, scheduler, averaged, objective)
        metrics, epoch0, step, seconds, skipped = (
            ckpt["metrics"],
            ckpt["epoch"],
            ckpt["step"],
            ckpt["seconds"],
            ckpt["skipped"],
        )
        checkpoint.set_rng_state(ckpt["rng"][distributed.rank()])
        if early is not None:
            early.load_state_dict(ckpt["early_stopping"])
            if early.exhausted(epoch0):
                raise ValueError(
                    f"run {cfg.resume!r} stopped early at epoch {epoch0}: its held-out {early.name} has not risen "
                    f"since epoch {early.best_epoch}, whose weights are its model; there is nothing to resume"
                )
    else:
        # Equal initial weights on every rank, different sampling noise.
        pyro.set_rng_seed(cfg.seed + distributed.rank())
    summary_writer = tensorboard_writer() if cfg.tensorboard and is_main else None
    # Every check has passed: only now is anything but the lock written.
    if is_main:
        run.start()
        if ckpt is not None and ckpt["config_edited"]:
            runs.keep_edited_config(out)
        if ckpt is not None and os.path.realpath(os.path.dirname(checkpoint.checkpoint_path(cfg.resume))) == (
            os.path.realpath(out)
        ):
            keep_edited_metrics(out, ckpt["metrics"])
        atomic_write_bytes(os.path.join(out, runs.CONFIG), lambda f: f.write(runs.config_text(cfg).encode()))
        if not os.path.exists(os.path.join(out, checkpoint.TEST_SPLIT)):
            # sample and evaluate need no data: the test split goes with the run where it is small
            checkpoint.save_test_split(out, ds.x_test, ds.y_test)
    writer = summary_writer(out) if summary_writer is not None else None
    eval_model = averaged.module if averaged is not None else model

    # disable=None: no bars when stderr is not a terminal (logs get the per-epoch lines only).
    epochs = tqdm(
        range(epoch0 + 1, cfg.epochs + 1), desc="epochs", initial=epoch0, total=cfg.epochs, disable=quiet or None
    )
    run.catch_interrupts()
    for epoch in epochs:
        t0 = time.perf_counter()
        recipe.on_epoch_start(cfg, epoch, objective)
        sampler.set_epoch(epoch)
        model.train()
        total, norms, done = 0.0, 0.0, 0
        steps = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=quiet or None)
        for xb, yb in steps:
            batch = recipe.prepare_batch(cfg, xb.to(device))  # lazy rows arrive on the CPU
            batch = recipe.with_labels(cfg, batch, yb)
            try:
                loss, norm = train_step(loss_fn, parameters, optimizer, batch, cfg.grad_clip, cfg.precision)
            except NonFiniteLossError as err:
                if cfg.nan_policy == "skip":
                    skipped += 1
                    log(f"step {step + 1} (epoch {epoch}) skipped: {err}")
                    continue
                raise nonfinite_stop(err, model, batch, step + 1, epoch, out) from err
            scheduler.step()
            step += 1
            if averaged is not None:
                averaged.update_parameters(model)
            total, norms, done = total + loss, norms + norm, done + 1
            if not quiet:  # running -ELBO per example
                steps.set_postfix(loss=f"{total / (done * cfg.batch_size):.2f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if run.stop_requested():  # Ctrl-C: the last epoch's checkpoint stays the one to resume
                raise run.interrupted(cfg.model, step, epoch)
        seconds += time.perf_counter() - t0
        # a bound's column is *_elbo (-loss); a loss that is not one keeps its own name and sign
        name = getattr(objective, "train_metric", "train_elbo")
        history.append({"epoch": epoch, name: (-total if name.endswith("_elbo") else total) / len(ds.x_train)})

        stop = False
        if early is not None:
            if is_main:
                eval_model.eval()
                early.update(epoch, early.evaluate(recipe, cfg, eval_model), model, eval_model if averaged else None)
                stop = early.exhausted(epoch)
            # rank 0 decides, every rank stops
            stop = bool(distributed.all_reduce_sum(torch.tensor([float(stop)], device=device)).item())
        if is_main and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs or stop):
            eval_model.eval()
            test = recipe.evaluate(cfg, eval_model, x_test)
            row = {
                "epoch": epoch,
                "step": step,
                name: history[-1][name],
                **test,
                **(early.metrics() if early is not None else {}),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": norms / done if done else math.nan,
                "seconds": seconds,
                "skipped_steps": skipped,
            }
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
            state = checkpoint.assemble(
                cfg,
                epoch,
                step,
                model,
                optimizer,
                scheduler,
                averaged,
                objective,
                rngs,
                metrics,
                seconds,
                skipped,
                ds.spec.to_dict(),
                history,
            )
            if early is not None:
                state["early_stopping"] = early.state_dict()
            atomic_torch_save(state, os.path.join(out, checkpoint.CHECKPOINT))
        if stop:
            log(
                f"stopped at epoch {epoch}: no higher held-out {early.name} for {cfg.early_stopping} epochs; the run's "
                f"model is epoch {early.best_epoch}'s (held-out {early.name} {early.best_score:.4g})"
            )
            break

    if writer is not None:
        writer.close()
    if early is not None and early.best_weights is not None:
        # the best epoch's weights are the run's model (rank 0 holds them; the other ranks' are not used)
        model.load_state_dict(early.best_weights["model"])
        if averaged is not None:
            averaged.module.load_state_dict(early.best_weights["ema"])
    if is_main:
        atomic_torch_save(dict(model.state_dict()), os.path.join(out, "model.pt"))
        write_figures(out, cfg, recipe, eval_model, ds, x_test, metrics, history)
    distributed.barrier()
    ema_model = averaged.module if averaged is not None else None
    return TrainResult(model, cfg, metrics, out, ema_model, early.best_epoch if early is not None else None)


def nonfinite_stop(err: NonFiniteLossError, model, batch, step: int, epoch: int, out: str) -> NonFiniteLossError:
    """The error that stops a run at a non-finite step: which step, which ELBO
    terms went bad, and the checkpoint left (the one of the last finished epoch)."""
    terms = ", ".join(nonfinite_terms(model, batch)) or "none on re-evaluation (a gradient or an unlucky draw)"
    path = os.path.join(out, checkpoint.CHECKPOINT)
    kept = (
        f"the last good checkpoint {path} (epoch {epoch - 1}) is kept; continue with --resume"
        if epoch > 1
        else "no epoch had finished, so there is no checkpoint"
    )
    return NonFiniteLossError(
        f"non-finite training loss at step {step} (epoch {epoch}): {err}; "
        f"ELBO terms not finite on this batch: {terms}. "
        f"Stopped: {kept}, or pass --nan-policy skip to skip such steps"
    )


def write_figures(
    out: str, cfg: TrainConfig, recipe, model, ds, x_test, metrics: list, history: list | None = None
) -> None:
    """The ELBO curves (every metric but epoch, step, lr, grad_norm and seconds;
    the training objective after every epoch from ``history``, the rest at each
    evaluation) and the recipe's figures, drawn with ``model`` (the EMA weights
    when there are any)."""
    names = dict.fromkeys(
        k
        for m in metrics
        for k in m
        if k not in ("epoch", "step", "lr", "grad_norm", "seconds", "skipped_steps", "best_epoch")
    )
    xs, curves = {}, {}
    for k in names:
        # A resumed older run's rows may lack a column, and its history the epochs before it was kept.
        points = {m["epoch"]: m[k] for m in metrics if k in m}
        points.update({h["epoch"]: h[k] for h in history or () if k in h})
        xs[k], curves[k] = sorted(points), [points[e] for e in sorted(points)]
    plots.plot_curves(
        os.path.join(out, "loss.png"),
        xs,
        curves,
        "epoch",
        {k: metric_unit(k) for k in curves},
        f"{cfg.model} on {ds.name}",
    )
    model.eval()
    recipe.write_figures(out, cfg, model, ds, x_test)
