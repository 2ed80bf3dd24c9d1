"""Early stopping: a held-out part of the training split, the stop after
``early_stopping`` epochs without a higher held-out ELBO, the best epoch's
weights as the run's model, and a resumed run that continues the count."""

import csv
import dataclasses

import pytest
import torch

import pyrovae
from pyrovae import data
from pyrovae.cli import main
from pyrovae.config import TrainConfig
from pyrovae.early_stopping import EarlyStopping
from pyrovae.train import train

PATIENCE = 3


def overfit_config(out, **changes) -> TrainConfig:
    """A VAE far larger than its 48 training digits (threshold-binarised, so
    every epoch sees the same pixels) at a high learning rate: the held-out
    ELBO peaks within about twenty epochs while the training ELBO climbs on."""
    cfg = TrainConfig(
        data="digits",
        train_size=64,
        held_out=16,
        test_size=16,
        batch_size=16,
        z_dim=8,
        hidden=[256],
        lr=0.02,
        binarize="threshold",
        test_particles=1,
        epochs=100,
        early_stopping=PATIENCE,
        quiet=True,
        out=str(out),
    )
    return dataclasses.replace(cfg, **changes)


def rows_without_timing(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    out = tmp_path_factory.mktemp("early") / "run"
    return train(overfit_config(out)), out


def test_a_run_stops_after_patience_epochs_without_a_higher_held_out_elbo(stopped):
    result, _ = stopped
    held_out = {row["epoch"]: row["held_out_elbo"] for row in result.metrics}
    last = result.metrics[-1]["epoch"]
    assert last < 100 and result.best_epoch == last - PATIENCE
    assert held_out[result.best_epoch] == max(held_out.values())
    assert all(held_out[e] < held_out[result.best_epoch] for e in range(result.best_epoch + 1, last + 1))
    assert [row["best_epoch"] for row in result.metrics][-PATIENCE - 1 :] == [result.best_epoch] * (PATIENCE + 1)
    # overfitting, not a plateau: the training ELBO still rose after the best held-out epoch
    train_elbo = {row["epoch"]: row["train_elbo"] for row in result.metrics}
    assert train_elbo[last] > train_elbo[result.best_epoch]


def test_the_run_keeps_the_best_epochs_weights_those_of_a_run_of_that_many_epochs(stopped, tmp_path):
    result, out = stopped
    shorter = train(overfit_config(tmp_path / "short", epochs=result.best_epoch))
    assert shorter.best_epoch == result.best_epoch
    last_weights = torch.load(tmp_path / "short" / "checkpoint.pt", weights_only=True)["model"]
    kept = torch.load(out / "model.pt", weights_only=True)
    loaded, _ = pyrovae.load(str(out))
    for name, value in last_weights.items():
        assert torch.equal(kept[name], value), name
        assert torch.equal(loaded.state_dict()[name], value), name
        assert torch.equal(result.model.state_dict()[name], value), name


def test_a_resumed_run_continues_the_patience_count_bit_for_bit(stopped, tmp_path):
    result, out = stopped
    # stopped at the best epoch: no improvement since, so only a restored count stops where the straight run did
    first = overfit_config(tmp_path / "resumed", epochs=result.best_epoch)
    train(first)
    resumed = train(dataclasses.replace(first, epochs=100, resume=first.out))
    assert resumed.best_epoch == result.best_epoch
    assert rows_without_timing(out / "metrics.csv") == rows_without_timing(tmp_path / "resumed" / "metrics.csv")
    a = torch.load(out / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    for part in (a["model"], a["early_stopping"]["model"]):
        other = b["model"] if part is a["model"] else b["early_stopping"]["model"]
        assert all(torch.equal(part[k], other[k]) for k in part)
    assert a["epoch"] == b["epoch"] and a["early_stopping"]["best_elbo"] == b["early_stopping"]["best_elbo"]


def test_the_patience_counts_from_the_end_of_the_kl_warmup():
    early = EarlyStopping(patience=2, x_held_out=torch.zeros(1, 1), seed=0, warmup=5)
    model = torch.nn.Linear(1, 1)
    for epoch, elbo in enumerate([-9.0, -8.0, -8.5, -8.5, -8.5, -8.5, -8.5], start=1):
        early.update(epoch, elbo, model, None)
    assert early.best_epoch == 2
    assert [early.exhausted(e) for e in (4, 5, 6, 7)] == [False, False, False, True]


def test_a_run_that_stopped_early_is_not_resumed(stopped):
    result, out = stopped
    cfg = dataclasses.replace(result.config, epochs=200, resume=str(out), out=str(out))
    with pytest.raises(ValueError, match=f"stopped early at epoch {result.metrics[-1]['epoch']}"):
        train(cfg)


def test_held_out_examples_are_drawn_by_the_seed_and_never_trained_on():
    ds = data.load_dataset("digits").subset(64, 16)
    kept, x_held, y_held = ds.hold_out(16, seed=3)
    again = ds.hold_out(16, seed=3)
    assert torch.equal(x_held, again[1]) and not torch.equal(x_held, ds.hold_out(16, seed=4)[1])
    assert len(kept.x_train) == 48 and len(x_held) == len(y_held) == 16
    rows = {tuple(r.tolist()) for r in kept.x_train}
    assert not rows & {tuple(r.tolist()) for r in x_held}
    assert rows | {tuple(r.tolist()) for r in x_held} == {tuple(r.tolist()) for r in ds.x_train}
    assert torch.equal(kept.x_test, ds.x_test)


def test_lazy_training_rows_stay_on_disk_when_a_part_is_held_out(tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (40, 4, 4), dtype=np.uint8))
    ds = data.load_dataset(str(tmp_path / "x.npy"), lazy=True)
    kept, x_held, _ = ds.hold_out(5, seed=0)
    assert isinstance(kept.x_train, data.LazyRows) and isinstance(x_held, data.LazyRows)
    order = torch.randperm(len(ds.x_train), generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_held.to("cpu"), ds.x_train[order[:5].sort().values.numpy()])


TINY = ["--data", "digits", "--train-size", "48", "--test-size", "16", "--z-dim", "2", "--hidden", "8", "--quiet"]


@pytest.mark.parametrize("flags", [["--early-stopping", "0"], ["--early-stopping", "-1"], ["--held-out", "0"]])
def test_a_patience_or_held_out_size_below_one_is_a_usage_error(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "vae", *TINY, *flags, "--out", str(tmp_path / "run")])
    assert stop.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--early-stopping", "2", "--held-out", "48"], "held_out must be < the 48 training examples"),
        (["--early-stopping", "2", "--held-out", "60"], "held_out must be < the 48 training examples"),
        (["--held-out", "8"], "it needs early_stopping"),
    ],
)
def test_a_held_out_part_without_early_stopping_or_training_examples_is_refused(flags, message, tmp_path, capsys):
    assert main(["train", "vae", *TINY, *flags, "--out", str(tmp_path / "run")]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_default_held_out_part_is_a_tenth_of_the_training_split(tmp_path):
    result = train(overfit_config(tmp_path / "run", held_out=None, train_size=60, epochs=1))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["early_stopping"]["held_out"] == 6 and result.metrics[0]["best_epoch"] == 1
