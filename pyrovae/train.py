"""The training loop: a config dataclass and a plain, visible SVI loop.

``train(TrainConfig(model="vae", ...))`` is what ``pyrovae train vae`` runs:
load data, build the model, ``SVI(model.model, model.guide, Adam, objective)``,
one pass over the training set per epoch, the test ELBO after each epoch, then
files:

    config.json  metrics.csv  model.pt  checkpoint.pt
    loss.png  samples.png  reconstructions.png
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam
from tqdm.auto import tqdm

from pyrovae import data as datasets
from pyrovae import plots
from pyrovae.device import resolve_device
from pyrovae.diffusion.training import DiffusionRecipe
from pyrovae.vae.training import VAERecipe

RECIPES = {"vae": VAERecipe(), "diffusion": DiffusionRecipe()}


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as ``config.json`` in the run folder."""

    model: str = "vae"
    data: str = "mnist5k"
    data_dir: str | None = None
    binarize: str = "dynamic"
    train_size: int | None = None
    test_size: int | None = None
    epochs: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    z_dim: int = 50
    hidden: list = field(default_factory=lambda: [400])
    elbo: str = "analytic"
    kl_warmup: int = 0
    test_particles: int = 10
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    validate: bool = True
    quiet: bool = False
    # diffusion only (pyrovae train diffusion); `hidden` sizes its MLP denoiser
    T: int = 1000
    schedule: str = "linear"
    net: str = "auto"
    channels: int = 16
    objective: str = "elbo"
    parameterization: str = "eps"
    variance: str = "beta_tilde"
    time_sampler: str = "uniform"
    sample_steps: int = 50

    def check(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the first bad field."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "test_particles": self.test_particles}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.kl_warmup < 0:
            raise ValueError(f"kl_warmup must be >= 0 epochs, got {self.kl_warmup}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.data not in datasets.DATASETS:
            raise ValueError(f"unknown dataset {self.data!r}; expected one of {', '.join(datasets.DATASETS)}")
        if self.model not in RECIPES:
            raise ValueError(f"unknown model {self.model!r}; expected one of {', '.join(RECIPES)}")
        RECIPES[self.model].check(self)
        resolve_device(self.device)
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


@dataclass
class TrainResult:
    model: torch.nn.Module
    config: TrainConfig
    metrics: list
    out_dir: str


def atomic_write_bytes(path: str, write) -> None:
    """Write a file through a temporary file in the same folder, fsync, then
    ``os.replace``: a reader sees either the old file or the new, never half."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def make_run_dir(cfg: TrainConfig) -> str:
    out = cfg.out or os.path.join("runs", f"{cfg.model}-{cfg.data}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ValueError(f"output folder {out!r} is not writable")
    return out


def write_metrics_csv(path: str, rows: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def train(cfg: TrainConfig) -> TrainResult:
    """Train the model ``cfg.model`` names by SVI; write the run's files; return it.

    The loop is the same for every model: a *recipe* (``RECIPES[cfg.model]``)
    says how to build the model/guide pair and its objective, how to prepare a
    batch, what to evaluate and which figures to draw.
    """
    cfg.check()
    recipe = RECIPES[cfg.model]
    device = resolve_device(cfg.device)
    out = make_run_dir(cfg)
    pyro.clear_param_store()
    pyro.set_rng_seed(cfg.seed)
    pyro.enable_validation(cfg.validate)
    log = (lambda *a: None) if cfg.quiet else print
    log(f"pyrovae train {cfg.model}, writing to {out}\n{cfg.to_json()}")
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(cfg.to_json())

    ds = datasets.load_dataset(cfg.data, cfg.data_dir).subset(cfg.train_size, cfg.test_size).to(device)
    x_test = recipe.prepare_test(cfg, ds.x_test)
    loader = datasets.make_loader(ds.x_train, ds.y_train, cfg.batch_size, shuffle=True)
    model = recipe.build(cfg, ds).to(device)
    objective = recipe.objective(cfg)
    svi = SVI(model.model, model.guide, Adam({"lr": cfg.lr}), loss=objective)

    metrics: list = []
    start = time.perf_counter()
    epochs = tqdm(range(1, cfg.epochs + 1), desc="epochs", disable=cfg.quiet)
    for epoch in epochs:
        recipe.on_epoch_start(cfg, epoch, objective)
        model.train()
        total = 0.0
        steps = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=cfg.quiet)
        for xb, _ in steps:
            loss = svi.step(recipe.prepare_batch(cfg, xb))
            total += loss
            steps.set_postfix(loss=f"{loss / len(xb):.2f}")
        model.eval()
        row = {"epoch": epoch, "train_elbo": -total / len(ds.x_train)}
        row.update(recipe.evaluate(cfg, model, x_test))
        row["seconds"] = time.perf_counter() - start
        metrics.append(row)
        epochs.set_postfix(test_elbo=f"{row['test_elbo']:.2f}")
        log(f"epoch {epoch}: " + "  ".join(f"{k} {v:.2f}" for k, v in row.items() if k not in ("epoch", "seconds")))
        atomic_torch_save({"model": model.state_dict(), "epoch": epoch, "config": dataclasses.asdict(cfg)}, os.path.join(out, "checkpoint.pt"))

    atomic_torch_save(model.state_dict(), os.path.join(out, "model.pt"))
    write_metrics_csv(os.path.join(out, "metrics.csv"), metrics)
    plots.plot_curves(
        os.path.join(out, "loss.png"),
        [m["epoch"] for m in metrics],
        {"train ELBO": [m["train_elbo"] for m in metrics], "test ELBO": [m["test_elbo"] for m in metrics]},
        "epoch",
        recipe.elbo_unit,
        f"{cfg.model} on {ds.name}",
    )
    recipe.write_figures(out, cfg, model, ds, x_test)
    return TrainResult(model, cfg, metrics, out)
