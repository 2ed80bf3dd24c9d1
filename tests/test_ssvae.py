"""The semi-supervised VAE (M2): its bound, its classifier, its parameters, its errors."""

import math
import re

import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch.distributions import Categorical, kl_divergence

from pyrovae import params
from pyrovae.data import binarize, load_dataset
from pyrovae.infer import TraceAnalyticKL_ELBO
from pyrovae.ssvae import SSVAE


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield


@pytest.fixture(scope="module")
def digits():
    """8x8 digits, thresholded: (x_train, y_train, x_test, y_test)."""
    d = load_dataset("digits")
    return (binarize(d.x_train, "threshold"), d.y_train, binarize(d.x_test, "threshold"), d.y_test)


def small_m2(seed: int = 3) -> SSVAE:
    torch.manual_seed(seed)
    return SSVAE(64, 10, z_dim=4, hidden=(32,), aux_weight=10.0)


def test_unlabelled_bound_is_the_sum_over_y_of_the_branch_closed_forms_at_the_same_z(digits):
    """U(x) = sum_y q(y|x) [log p(x|y,z_y) - KL(q(z|x,y) || p(z)) + log p(y)] + H(q(y|x)),
    z_y the draw the ELBO made in branch y."""
    m2, x = small_m2(), digits[0][:6]
    draws = []

    def guide(x):
        draws.append(m2.guide(x))
        return draws[-1]

    loss = TraceAnalyticKL_ELBO(max_plate_nesting=1).loss(m2.model, guide, x)
    (z,) = draws
    assert z.shape == (10, 6, 4)  # one z per class and example
    with torch.no_grad():
        q_y = Categorical(logits=m2.classifier(x))
        branches = torch.arange(10)[:, None].expand(10, 6)
        log_px = m2.likelihood(m2.decoder(m2._with_class(z, branches))).log_prob(x)
        kl_z = kl_divergence(m2.encoder(m2._with_class(x, branches)), m2.prior())
        per_branch = log_px - kl_z + math.log(1 / 10)
        u = (q_y.probs.T * per_branch).sum(0) + q_y.entropy()
    assert -loss == pytest.approx(u.sum().item(), rel=1e-5)


def test_trains_with_stock_svi_and_the_loss_falls_and_accuracy_beats_chance(digits):
    """100 labels (10 per class), 200 unlabelled digits, a few epochs: the
    bound rises and q(y|x) classifies the test digits well above chance (10%)."""
    x_train, y_train, x_test, y_test = digits
    labelled = torch.cat([torch.nonzero(y_train == k)[:10, 0] for k in range(10)])
    unlabelled = torch.arange(len(y_train))[~torch.isin(torch.arange(len(y_train)), labelled)][:200]
    m2 = small_m2()
    optim = Adam({"lr": 3e-3})
    svi = SVI(m2.model, m2.guide, optim, TraceAnalyticKL_ELBO(max_plate_nesting=1))
    aux = SVI(m2.model_classify, m2.guide_classify, optim, Trace_ELBO())
    losses = []
    for _ in range(12):
        total = 0.0
        for i in range(0, 200, 50):
            total += svi.step(x_train[unlabelled[i : i + 50]])
            batch = labelled[i // 2 : i // 2 + 25]
            total += svi.step(x_train[batch], y_train[batch])
            aux.step(x_train[batch], y_train[batch])
        losses.append(total / 300)
    accuracy = m2.accuracy(x_test, y_test)
    print(f"M2 on digits, 100 labels: loss {losses[0]:.1f} -> {losses[-1]:.1f}, test accuracy {accuracy:.3f}")
    assert losses[-1] < losses[0] - 5
    assert accuracy > 0.3


def test_auxiliary_loss_is_the_classification_term_and_model_classify_gives_it_to_svi(digits):
    m2, x, y = small_m2(), digits[0][:8], digits[1][:8]
    want = -10.0 * Categorical(logits=m2.classifier(x)).log_prob(y).sum()
    assert m2.auxiliary_loss(x, y).item() == pytest.approx(want.item(), rel=1e-6)
    assert Trace_ELBO().loss(m2.model_classify, m2.guide_classify, x, y) == pytest.approx(want.item(), rel=1e-6)


def test_two_models_in_one_process_train_independently(digits):
    first, second = small_m2(1), small_m2(2)
    before = [p.detach().clone() for p in second.parameters()]
    svi = SVI(first.model, first.guide, Adam({"lr": 1e-2}), TraceAnalyticKL_ELBO(max_plate_nesting=1))
    svi.step(digits[0][:16])
    assert all(torch.equal(a, b) for a, b in zip(before, second.parameters()))
    assert params.pyro_name(first, "ssvae") != params.pyro_name(second, "ssvae")


@pytest.mark.parametrize(
    "y, error, message",
    [
        (torch.zeros(4), TypeError, "y must be an integer tensor"),
        (torch.zeros(3, dtype=torch.long), ValueError, r"y must have shape \(batch,\) = \(4,\)"),
        (torch.tensor([0, 1, 10, 2]), ValueError, r"y must hold classes in \[0, 10\), got values in \[0, 10\]"),
    ],
)
def test_bad_labels_are_refused_naming_y(digits, y, error, message):
    with pytest.raises(error, match=message):
        small_m2().model(digits[0][:4], y)


def test_num_classes_must_be_at_least_two():
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2, got 1"):
        SSVAE(64, 1)


# ---------------------------------------------------------------------------
# The command line: pyrovae train vae --labelled N, pyrovae evaluate.

M2_FLAGS = ["--data", "digits", "--train-size", "200", "--test-size", "60", "--z-dim", "2", "--hidden", "8"]


def test_cli_trains_m2_with_labels_and_evaluate_reports_the_test_accuracy(tmp_path, capsys):
    import csv
    import json

    from pyrovae.cli import main

    out = str(tmp_path / "run")
    argv = ["train", "vae", *M2_FLAGS, "--labelled", "20", "--aux-weight", "5", "--epochs", "1", "--quiet"]
    assert main([*argv, "--out", out]) == 0
    (row,) = csv.DictReader(open(f"{out}/metrics.csv"))
    assert "train_loss" in row and "train_elbo" not in row  # the classification term makes it no bound
    assert 0 <= float(row["test_accuracy"]) <= 1
    assert float(row["test_elbo"]) == pytest.approx(float(row["test_recon"]) - float(row["test_kl_top"]), rel=1e-5)
    capsys.readouterr()
    assert main(["evaluate", "vae", out]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["test_accuracy"] == pytest.approx(float(row["test_accuracy"]))


def test_early_stopping_keeps_the_epoch_of_best_held_out_accuracy_not_best_bound(tmp_path):
    """M2 is selected as Pyro's example selects it: by the held-out accuracy of
    q(y|x). On this run the held-out bound peaks at another epoch than the
    accuracy (checked), so selection by the bound would keep other weights."""
    import pyrovae
    from pyrovae.config import TrainConfig
    from pyrovae.train import train

    cfg = TrainConfig(
        model="vae", data="digits", train_size=300, test_size=60, held_out=100, z_dim=2, hidden=[16],
        labelled=20, aux_weight=20.0, lr=0.03, epochs=12, early_stopping=12, test_particles=1, quiet=True,
        out=str(tmp_path / "run"),
    )  # fmt: skip
    result = train(cfg)
    accuracy = {row["epoch"]: row["held_out_accuracy"] for row in result.metrics}
    bound = {row["epoch"]: row["held_out_elbo"] for row in result.metrics}
    assert result.best_epoch == min(e for e, a in accuracy.items() if a == max(accuracy.values()))
    assert max(bound, key=bound.get) != result.best_epoch
    # the run's model is that epoch's: its held-out accuracy is the best one
    loaded, _ = pyrovae.load(cfg.out)
    ckpt = torch.load(f"{cfg.out}/checkpoint.pt", weights_only=False)
    assert ckpt["early_stopping"]["select_by"] == "test_accuracy"
    assert ckpt["early_stopping"]["best_elbo"] == accuracy[result.best_epoch]
    kept = ckpt["early_stopping"]["model"].values()
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), kept))


def test_labelled_keeps_n_labels_balanced_over_the_classes_and_seeded():
    from pyrovae.config import TrainConfig, recipe_for

    d = load_dataset("digits").subset(300, 10)
    cfg = TrainConfig(model="vae", data="digits", labelled=25, seed=3)
    recipe = recipe_for(cfg)
    kept = recipe.prepare_data(cfg, d).y_train
    assert (kept >= 0).sum() == 25
    counts = torch.bincount(kept[kept >= 0], minlength=10)
    assert counts.tolist() == [3] * 5 + [2] * 5
    assert (kept[kept >= 0] == d.y_train[kept >= 0]).all()
    assert torch.equal(recipe.prepare_data(cfg, d).y_train, kept)
    other = recipe.prepare_data(TrainConfig(model="vae", data="digits", labelled=25, seed=4), d).y_train
    assert not torch.equal(other, kept)


@pytest.mark.parametrize(
    "labelled, message",
    [
        ("5", r"labelled must be at least one per class \(10\), got 5"),
        ("500", r"at most the training set's size \(200\)"),
    ],
)
def test_cli_refuses_labelled_below_one_per_class_or_above_the_training_set(labelled, message, tmp_path, capsys):
    from pyrovae.cli import main

    argv = ["train", "vae", *M2_FLAGS, "--labelled", labelled, "--epochs", "1", "--quiet", "--out", str(tmp_path)]
    assert main(argv) == 1
    assert re.search(message, capsys.readouterr().err)


def test_labelled_refuses_data_without_labels(tmp_path):
    import numpy as np

    from pyrovae.cli import main

    path = tmp_path / "unlabelled.npy"
    np.save(path, (np.random.default_rng(0).random((60, 8, 8)) > 0.5).astype(np.float32))
    argv = ["train", "vae", "--data", str(path), "--labelled", "10", "--epochs", "1", "--quiet", "--debug"]
    with pytest.raises(ValueError, match="--labelled needs labelled data; data .* has no labels"):
        main([*argv, "--out", str(tmp_path / "run")])
