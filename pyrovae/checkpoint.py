"""Checkpoints: everything a run needs to continue exactly where it stopped.

This module owns the format: :func:`assemble` builds the dict the trainer
saves, :func:`load_checkpoint` reads one (converting older formats),
:func:`restore` puts it back into a model, optimiser, scheduler, averaged
model and time sampler, and :func:`load` rebuilds a trained model without
its data. A checkpoint is one file, ``checkpoint.pt`` in the run folder,
holding only plain tensors, numbers, strings, lists and dicts, so that
``torch.load(path, weights_only=True)`` reads it without unpickling code::

    format        CHECKPOINT_FORMAT (2)
    config        the run's config as a dict (pyrovae.config; ``model`` names its class)
    epoch, step   the last finished epoch and optimiser step
    model         the model's state_dict (parameters and buffers)
    ema           the averaged model's weights (a state_dict with the model's keys) or None
    ema_updates   how many updates the average has had (AveragedModel.n_averaged) or None
    optimizer     the torch optimiser's state_dict (one optimiser over all parameters)
    scheduler     the LambdaLR's state_dict
    time_sampler  the objective's time sampler's state_dict, or None (no sampler, or none with state)
    rng           one entry per process: Python, NumPy, torch and CUDA generator states
    metrics       the metrics.csv rows so far
    seconds       training time so far
    skipped       training steps skipped for a NaN/inf loss (``--nan-policy skip``)
    data          the data's DataSpec as a dict (name, image_shape, values), so
                  the model is rebuilt without the data (absent before it was saved)
    early_stopping  with --early-stopping only: held_out (its size), select_by (the
                  score watched: test_elbo, or M2's test_accuracy), best_epoch,
                  best_elbo (the best score), last (the last held-out evaluation),
                  and the best epoch's model and ema weights,
                  which load() returns (pyrovae.early_stopping)
    history       the training objective after every epoch, ``[{"epoch": e, "train_elbo": v}]``
                  (loss.png's curve; absent before it was kept)

Beside it, ``test-split.pt`` (:func:`save_test_split`) holds the run's test
split when it is small, so that ``sample`` and ``evaluate`` need no data.

Format 1 (pyrovae 0.1: Pyro's per-parameter optimisers) is converted on read:
its ``optim`` (per param-store name ``"vae$$$encoder.0.weight"``, a torch
optimiser and a scheduler over that one tensor) becomes one optimiser state
over the model's parameters in their order, in :func:`restore`, where the
model is at hand.

It is written atomically (:func:`atomic_torch_save`), so a kill during a save
leaves the previous checkpoint in place.
"""

from __future__ import annotations

import os
import random
import re
import tempfile

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
TEST_SPLIT = "test-split.pt"
TEST_SPLIT_MAX_BYTES = 64 * 2**20  # mnist5k's 10,000 test images are 7.5 MiB as bytes
CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)
# Our temporaries end in ".pyrovae-tmp-<pid>": no user's file is mistaken for one.
TMP_SUFFIX = ".pyrovae-tmp-"
_TMP_NAME = re.compile(r"^\..+" + re.escape(TMP_SUFFIX) + r"(\d+)$")


def atomic_write_bytes(path: str, write) -> None:
    """Write a file through a temporary file in the same folder, fsync, then
    ``os.replace``: a reader sees either the old file or the new, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=f"{TMP_SUFFIX}{os.getpid()}")
    try:
        # mkstemp makes the file private (0600); a run's files should read like any other file.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):  # disk full, quota, I/O error: say what survived
            raise OSError(
                err.errno,
                f"could not write {path}: {err.strerror or err}; "
                f"the previous {os.path.basename(path)} there, if any, is left as it was",
            ) from err
        raise
    # The rename itself is durable only once the folder's entry is on disk.
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def remove_stale_temporaries(folder: str) -> None:
    """Delete the temporary files of writes that a killed process left behind
    (a SIGKILL skips the clean-up in :func:`atomic_write_bytes`); each is as
    large as a checkpoint. Only names :func:`atomic_write_bytes` makes, of a
    process other than this one, are removed (the caller holds the folder's lock)."""
    for name in os.listdir(folder):
        match = _TMP_NAME.match(name)
        if match and int(match.group(1)) != os.getpid():
            os.unlink(os.path.join(folder, name))


def atomic_torch_save(obj, path: str) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def rng_state() -> dict:
    """This process's Python, NumPy, torch and CUDA generator states as plain
    values (NumPy's key array becomes an int64 tensor, tuples become lists)."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(path: str) -> str:
    """``path`` itself if it is a file, else ``path/checkpoint.pt``."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no checkpoint at {path!r}: expected a run folder holding {CHECKPOINT} or a checkpoint file"
        )
    return path


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint (a run folder or a file) onto the CPU with
    ``weights_only=True``; raise ``ValueError`` if it is not one of ours."""
    path = checkpoint_path(path)
    if os.path.getsize(path) == 0:
        raise ValueError(f"cannot read checkpoint {path!r}: the file is empty (0 bytes), not a pyrovae checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a corrupt or foreign file
        raise ValueError(f"cannot read checkpoint {path!r}: not a pyrovae checkpoint ({_load_failure(err)})") from err
    if isinstance(ckpt, dict) and "format" not in ckpt and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        raise ValueError(
            f"{path!r} is not a pyrovae checkpoint: it holds a model's weights only (a state_dict, as a run's "
            f"model.pt does); give the run folder or its {CHECKPOINT}, or load the weights with model.load_state_dict"
        )
    if not isinstance(ckpt, dict) or ckpt.get("format") not in READABLE_FORMATS:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{path!r} is not a pyrovae checkpoint of format {' or '.join(map(str, READABLE_FORMATS))} "
            f"(found {found!r})"
        )
    return convert(ckpt)


def convert(ckpt: dict) -> dict:
    """A checkpoint dict of any readable format in the current one. Format 1's
    per-parameter optimiser states stay under ``legacy_optim`` until
    :func:`restore` maps them onto the model's parameters."""
    if ckpt["format"] == CHECKPOINT_FORMAT:
        return ckpt
    ckpt = dict(ckpt)
    ckpt.update(
        format=CHECKPOINT_FORMAT,
        legacy_optim=ckpt.pop("optim"),
        optimizer=None,
        scheduler=None,
        # the old EMA was updated after every optimiser step
        ema_updates=ckpt["step"] if ckpt.get("ema") is not None else None,
        time_sampler=None,
        skipped=ckpt.get("skipped", 0),  # absent before --nan-policy
    )
    return ckpt


def assemble(
    cfg,
    epoch: int,
    step: int,
    model,
    optimizer,
    scheduler,
    averaged,
    objective,
    rngs: list,
    metrics: list,
    seconds: float,
    skipped: int,
    data: dict,
    history: list | None = None,
) -> dict:
    """The checkpoint dict of a run after ``epoch`` (the format in the module docstring)."""
    sampler = getattr(objective, "time_sampler", None)
    return {
        "format": CHECKPOINT_FORMAT,
        "config": cfg.to_dict(),
        "epoch": epoch,
        "step": step,
        "model": dict(model.state_dict()),
        "ema": dict(averaged.module.state_dict()) if averaged is not None else None,
        "ema_updates": int(averaged.n_averaged) if averaged is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "time_sampler": sampler.state_dict() if hasattr(sampler, "state_dict") else None,
        "rng": rngs,
        "metrics": metrics,
        "seconds": seconds,
        "skipped": skipped,
        "data": data,
        "history": list(history or []),
    }


def _from_bytes(x8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x8.float().div(255).to(dtype)


def save_test_split(folder: str, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Write a run's test split to ``folder/test-split.pt`` (8-bit levels as
    bytes, when that is exact) unless it is larger than
    :data:`TEST_SPLIT_MAX_BYTES`; return whether it was written."""
    x = x.detach().cpu()
    stored = x
    if x.is_floating_point():
        x8 = (x.float() * 255).round().clamp(0, 255).to(torch.uint8)
        if torch.equal(_from_bytes(x8, x.dtype), x):
            stored = x8
    if stored.numel() * stored.element_size() > TEST_SPLIT_MAX_BYTES:
        return False
    split = {"format": 1, "x": stored, "y": y.detach().cpu(), "dtype": str(x.dtype).removeprefix("torch.")}
    atomic_torch_save(split, os.path.join(folder, TEST_SPLIT))
    return True


def load_test_split(folder: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The test split :func:`save_test_split` wrote in ``folder``, as ``(x, y)``; ``None`` if there is none."""
    path = os.path.join(folder, TEST_SPLIT)
    if not os.path.isfile(path):
        return None
    try:
        split = torch.load(path, map_location="cpu", weights_only=True)
        x, dtype = split["x"], getattr(torch, split["dtype"])
    except Exception as err:  # a truncated or foreign file: the message says which
        raise ValueError(
            f"cannot read the run's test split {path!r} ({_load_failure(err)}); delete it to use the data set instead"
        ) from err
    return (_from_bytes(x, dtype) if x.dtype == torch.uint8 and dtype != torch.uint8 else x), split["y"]


def restore(ckpt: dict, source: str, model, optimizer, scheduler, averaged=None, objective=None) -> None:
    """Put a checkpoint's training state back: the model's weights, the
    optimiser's and the scheduler's state, the averaged model and the
    objective's time sampler (each where the run has one)."""
    load_model_state(model, ckpt["model"], source)
    if ckpt.get("legacy_optim") is not None:
        optimizer_state, scheduler_state = legacy_optimizer_state(ckpt["legacy_optim"], model, optimizer, scheduler)
    else:
        optimizer_state, scheduler_state = ckpt["optimizer"], ckpt["scheduler"]
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    if averaged is not None:
        if ckpt["ema"] is None:
            raise ValueError(f"checkpoint {source!r} holds no averaged weights, but the run keeps an EMA")
        load_model_state(averaged.module, ckpt["ema"], source)
        averaged.n_averaged.fill_(ckpt["ema_updates"])
    sampler = getattr(objective, "time_sampler", None)
    if ckpt.get("time_sampler") is not None and hasattr(sampler, "load_state_dict"):
        sampler.load_state_dict(ckpt["time_sampler"])


def legacy_optimizer_state(optim: dict, model, optimizer, scheduler) -> tuple[dict, dict]:
    """Format 1's per-parameter Pyro optimiser states as one torch optimiser's
    and one scheduler's state: parameter i of ``model.named_parameters()``
    takes the moments saved under ``"<prefix>$$$<its name>"`` (a parameter
    without one, never stepped, starts fresh), the learning rate and the
    schedule's position come from any one of them (all stepped alike)."""
    by_name = {key.split("$$$", 1)[1]: value for key, value in optim.items()}
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    state = optimizer.state_dict()
    first = next(iter(by_name.values()))
    state["state"] = {
        i: by_name[name]["optimizer"]["state"][0]
        for i, name in enumerate(names)
        if name in by_name and by_name[name]["optimizer"]["state"]
    }
    for key in ("lr", "initial_lr"):
        if key in first["optimizer"]["param_groups"][0]:
            state["param_groups"][0][key] = first["optimizer"]["param_groups"][0][key]
    sched = scheduler.state_dict()
    sched.update(
        {k: v for k, v in first["scheduler"].items() if k in ("last_epoch", "_step_count", "_last_lr", "base_lrs")}
    )
    return state, sched


def _load_failure(err: Exception) -> str:
    """What ``torch.load(weights_only=True)`` found wrong, without its advice to
    retry unsafely (checkpoints never need code to be unpickled)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    kept = [
        line
        for line in lines
        if "weights_only" not in line and not line.startswith(("Check the documentation", "Please file an issue"))
    ]
    return f"{type(err).__name__}: {kept[-1]}" if kept else type(err).__name__


def config_mismatches(saved: dict, requested: dict, ignore=()) -> list[str]:
    """Human-readable differences ``"field: checkpoint X, requested Y"`` between
    two config dicts, skipping the fields in ``ignore``."""
    return [
        f"{name}: checkpoint {saved.get(name)!r}, requested {requested.get(name)!r}"
        for name in sorted(set(saved) | set(requested))
        if name not in ignore and saved.get(name) != requested.get(name)
    ]


def load(path: str, model: str | None = None, ema: bool = True, device: str = "cpu"):
    """A trained model and its config back from a run folder or checkpoint file.

    :param path: a run folder (holding ``checkpoint.pt``) or a checkpoint file.
    :param model: if given, the model name expected (e.g. ``"vae"``); a
        checkpoint of another model is a ``ValueError`` naming both.
    :param ema: load the EMA weights when the run kept them (they are the
        ones to sample and evaluate with); ``False`` loads the raw weights.
    :param device: where to put the model.
    :returns: ``(model, config)``, the model in eval mode, ready for
        ``sample``, ``reconstruct``, evaluation or further SVI.
    """
    from pyrovae import data as datasets
    from pyrovae.config import TrainConfig, resolve
    from pyrovae.device import resolve_device
    from pyrovae.recipes import recipe_for
    from pyrovae.runs import warn_config_edits

    ckpt = load_checkpoint(path)
    # the checkpoint's settings are the run's: a hand edit of config.json is named, not applied
    warn_config_edits(os.path.dirname(checkpoint_path(path)), ckpt["config"], "loading the model")
    cfg = resolve(TrainConfig.from_dict(ckpt["config"]))
    if model is not None and model != cfg.model:
        raise ValueError(f"checkpoint {path!r} holds a {cfg.model!r} model, but model={model!r} was requested")
    net = recipe_for(cfg).build(cfg, datasets.run_spec(ckpt, cfg))
    # an early-stopped run's model is its best epoch's weights, kept beside the last epoch's (pyrovae.early_stopping)
    weights = ckpt["early_stopping"] if (ckpt.get("early_stopping") or {}).get("model") is not None else ckpt
    state = weights["ema"] if ema and weights.get("ema") is not None else weights["model"]
    load_model_state(net, state, path)
    return net.to(resolve_device(device)).eval(), cfg


def load_model_state(model: torch.nn.Module, state: dict, source: str) -> None:
    """``model.load_state_dict(state)`` with a ``ValueError`` that names the
    missing, unexpected and mis-shaped entries. A model with an
    ``upgrade_state_dict`` method first maps a state saved by an older pyrovae
    onto its own layout."""
    if hasattr(model, "upgrade_state_dict"):
        state = model.upgrade_state_dict(state)
    own = model.state_dict()
    problems = [f"missing {k}" for k in own if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in own]
    problems += [
        f"{k} has shape {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise ValueError(f"checkpoint {source!r} does not fit the model its config builds: " + "; ".join(problems))
    model.load_state_dict(state)
