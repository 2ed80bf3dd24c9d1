"""The training loop: a config dataclass and a plain, visible SVI loop.

``train_vae(TrainConfig(...))`` is what ``pyrovae train vae`` runs: load data,
build the VAE, ``SVI(vae.model, vae.guide, Adam, elbo)``, one pass over the
training set per epoch, the test ELBO after each epoch, then files:

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
from pyrovae.infer import make_elbo
from pyrovae.vae import VAE, build_vae


@dataclass
class TrainConfig:
    """Everything a run depends on; saved as ``config.json`` in the run folder."""

    model: str = "vae"
    data: str = "mnist5k"
    data_dir: str | None = None
    binarize: str = "dynamic"
    train_size: int | None = None
    test_size: int | None = None
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-3
    z_dim: int = 50
    hidden: list = field(default_factory=lambda: [400])
    elbo: str = "trace"
    test_particles: int = 10
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    validate: bool = True
    quiet: bool = False

    def check(self) -> "TrainConfig":
        """Raise ``ValueError`` naming the first bad field."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "z_dim": self.z_dim, "test_particles": self.test_particles}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.data not in datasets.DATASETS:
            raise ValueError(f"unknown dataset {self.data!r}; expected one of {', '.join(datasets.DATASETS)}")
        if self.binarize not in datasets.BINARIZE:
            raise ValueError(f"unknown binarize mode {self.binarize!r}; expected one of {', '.join(datasets.BINARIZE)}")
        make_elbo(self.elbo)
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


@torch.no_grad()
def estimate_elbo(elbo, model, guide, x: torch.Tensor, batch_size: int = 500) -> float:
    """The ELBO averaged over the examples of ``x`` (nats per example)."""
    total = 0.0
    for i in range(0, len(x), batch_size):
        total -= elbo.loss(model, guide, x[i : i + batch_size])
    return total / len(x)


def write_metrics_csv(path: str, rows: list) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def train_vae(cfg: TrainConfig) -> TrainResult:
    """Train a VAE by SVI as ``cfg`` says; write the run's files; return the model."""
    cfg.check()
    device = resolve_device(cfg.device)
    out = make_run_dir(cfg)
    pyro.clear_param_store()
    pyro.set_rng_seed(cfg.seed)
    pyro.enable_validation(cfg.validate)
    log = (lambda *a: None) if cfg.quiet else print
    log(f"pyrovae train vae, writing to {out}\n{cfg.to_json()}")
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(cfg.to_json())

    ds = datasets.load_dataset(cfg.data, cfg.data_dir).subset(cfg.train_size, cfg.test_size).to(device)
    x_test = datasets.binarize_test(ds.x_test, cfg.binarize)
    loader = datasets.make_loader(ds.x_train, ds.y_train, cfg.batch_size, shuffle=True)
    vae = build_vae(ds.x_dim, cfg.z_dim, tuple(cfg.hidden)).to(device)

    elbo = make_elbo(cfg.elbo)
    test_elbo = make_elbo(cfg.elbo, num_particles=cfg.test_particles, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(vae.model, vae.guide, Adam({"lr": cfg.lr}), loss=elbo)

    metrics: list = []
    start = time.perf_counter()
    epochs = tqdm(range(1, cfg.epochs + 1), desc="epochs", disable=cfg.quiet)
    for epoch in epochs:
        vae.train()
        total = 0.0
        steps = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=cfg.quiet)
        for xb, _ in steps:
            loss = svi.step(datasets.binarize(xb, cfg.binarize))
            total += loss
            steps.set_postfix(loss=f"{loss / len(xb):.2f}")
        vae.eval()
        row = {
            "epoch": epoch,
            "train_elbo": -total / len(ds.x_train),
            "test_elbo": estimate_elbo(test_elbo, vae.model, vae.guide, x_test),
            "seconds": time.perf_counter() - start,
        }
        metrics.append(row)
        epochs.set_postfix(test_elbo=f"{row['test_elbo']:.2f}")
        log(f"epoch {epoch}: train ELBO {row['train_elbo']:.2f}  test ELBO {row['test_elbo']:.2f} nats/image")
        atomic_torch_save({"model": vae.state_dict(), "epoch": epoch, "config": dataclasses.asdict(cfg)}, os.path.join(out, "checkpoint.pt"))

    write_outputs(out, vae, ds, x_test, metrics)
    return TrainResult(vae, cfg, metrics, out)


def write_outputs(out: str, vae: VAE, ds: datasets.Dataset, x_test: torch.Tensor, metrics: list) -> None:
    """model.pt, metrics.csv and the three figures."""
    atomic_torch_save(vae.state_dict(), os.path.join(out, "model.pt"))
    write_metrics_csv(os.path.join(out, "metrics.csv"), metrics)
    epochs = [m["epoch"] for m in metrics]
    plots.plot_curves(
        os.path.join(out, "loss.png"),
        epochs,
        {"train ELBO": [m["train_elbo"] for m in metrics], "test ELBO": [m["test_elbo"] for m in metrics]},
        "epoch",
        "ELBO (nats per image)",
        f"VAE on {ds.name}",
    )
    if ds.is_image:
        plots.save_image_grid(os.path.join(out, "samples.png"), vae.sample(64), ds.image_shape, 8, "samples E[x|z], z ~ p(z)")
        x = x_test[:32]
        pairs = torch.stack([x, vae.reconstruct(x)], 1).reshape(64, -1)
        plots.save_image_grid(os.path.join(out, "reconstructions.png"), pairs, ds.image_shape, 8, "test image | reconstruction")
