"""Checkpoints: plain contents, atomic writes, exact resume, pyrovae.load, mismatch errors."""

import csv
import json
import os
import random
import shutil

import numpy as np
import pyro
import pytest
import torch

import pyrovae
from pyrovae import checkpoint
from pyrovae.checkpoint import atomic_torch_save, load_checkpoint, rng_state, set_rng_state
from pyrovae.cli import main
from pyrovae.train import RECIPES, TrainConfig, train

TINY = [
    "--data",
    "digits",
    "--train-size",
    "48",
    "--test-size",
    "32",
    "--batch-size",
    "16",
    "--z-dim",
    "3",
    "--hidden",
    "8",
    "--quiet",
]
# Every piece of state a resume must restore: Adam moments under a scheduler,
# the warm-up and decay position, the EMA, the KL warm-up (set per epoch by the recipe's hook),
# and the torch RNG (dynamic binarisation, z draws).
FULL = [
    "--kl-warmup",
    "3",
    "--optimizer",
    "clippedadam",
    "--lr-schedule",
    "exponential",
    "--lr-gamma",
    "0.8",
    "--warmup-steps",
    "4",
    "--grad-clip",
    "50",
    "--ema-decay",
    "0.9",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "vae", *TINY, *FULL, "--epochs", "2", "--out", str(out)]) == 0
    return out


def test_checkpoint_reads_with_weights_only_and_holds_the_full_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert set(ckpt) == {
        "format",
        "config",
        "epoch",
        "step",
        "model",
        "ema",
        "ema_updates",
        "optimizer",
        "scheduler",
        "time_sampler",
        "rng",
        "metrics",
        "seconds",
        "skipped",
        "data",
        "history",
    }
    assert (ckpt["epoch"], ckpt["step"]) == (2, 6)
    assert TrainConfig.from_dict(ckpt["config"]).ema_decay == 0.9
    assert set(ckpt["ema"]) == set(ckpt["model"]) and ckpt["ema_updates"] == 6
    # one optimiser over every parameter of the VAE, one scheduler
    model, _ = pyrovae.load(str(run_dir))
    assert len(ckpt["optimizer"]["param_groups"]) == 1
    assert len(ckpt["optimizer"]["state"]) == len(list(model.parameters()))
    assert ckpt["scheduler"]["last_epoch"] == 6
    assert all({"python", "numpy", "torch", "cuda"} <= set(r) for r in ckpt["rng"])
    assert [m["epoch"] for m in ckpt["metrics"]] == [1, 2]


def test_rng_state_round_trip_replays_python_numpy_and_torch_streams():
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    np.random.normal()  # leaves a cached Gaussian in NumPy's state
    state = rng_state()
    first = (random.random(), np.random.normal(), torch.randn(3))
    set_rng_state(state)
    again = (random.random(), np.random.normal(), torch.randn(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])


def test_failed_save_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save({"format": checkpoint.CHECKPOINT_FORMAT, "epoch": 1}, str(path))

    def write_half_then_die(f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # as a kill arriving mid-save

    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write_bytes(str(path), write_half_then_die)
    assert load_checkpoint(str(tmp_path))["epoch"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def read_rows_without_timing(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_two_epochs_then_resume_two_equals_four_epochs_bit_for_bit(run_dir, tmp_path):
    straight = tmp_path / "straight"
    assert main(["train", "vae", *TINY, *FULL, "--epochs", "4", "--out", str(straight)]) == 0
    resumed = tmp_path / "resumed"
    # a copy of the 2-epoch run, continued with nothing but --epochs
    resumed.mkdir()
    for name in ("checkpoint.pt", "config.json", "metrics.csv"):
        (resumed / name).write_bytes((run_dir / name).read_bytes())
    assert main(["train", "vae", "--resume", str(resumed), "--epochs", "4", "--quiet"]) == 0

    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for i, state in a["optimizer"]["state"].items():
        for slot, moment in state.items():
            assert torch.equal(torch.as_tensor(moment), torch.as_tensor(b["optimizer"]["state"][i][slot])), (i, slot)
    assert a["scheduler"] == b["scheduler"] and a["ema_updates"] == b["ema_updates"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    assert read_rows_without_timing(straight / "metrics.csv") == read_rows_without_timing(resumed / "metrics.csv")
    assert len(read_rows_without_timing(resumed / "metrics.csv")) == 4


def test_resume_with_a_changed_model_setting_names_the_mismatch(run_dir, capsys):
    assert (
        main(["train", "vae", "--resume", str(run_dir), "--epochs", "3", "--z-dim", "5", "--lr", "0.01", "--quiet"])
        == 1
    )
    err = capsys.readouterr().err
    assert "z_dim: checkpoint 3, requested 5" in err and "lr: checkpoint 0.001, requested 0.01" in err


def test_resume_in_python_checks_the_whole_config(run_dir):
    cfg = TrainConfig.from_dict(
        {**json.loads((run_dir / "config.json").read_text()), "epochs": 3, "hidden": [9], "resume": str(run_dir)}
    )
    with pytest.raises(ValueError, match=r"hidden: checkpoint \[8\], requested \[9\]"):
        train(cfg)


def test_resume_needs_more_epochs_than_were_done(run_dir, capsys):
    assert main(["train", "vae", "--resume", str(run_dir), "--epochs", "2", "--quiet"]) == 1
    assert "epochs must be > 2" in capsys.readouterr().err


def test_load_returns_the_model_with_ema_weights_and_its_config(run_dir):
    model, cfg = pyrovae.load(str(run_dir))
    ckpt = load_checkpoint(str(run_dir))
    assert cfg == TrainConfig.from_dict(ckpt["config"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["ema"][k]), k
    raw, _ = pyrovae.load(str(run_dir / "checkpoint.pt"), ema=False)
    for k, v in raw.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    assert model.sample(5).shape == (5, 64)
    x = torch.bernoulli(torch.full((4, 64), 0.3))
    assert model.reconstruct(x).shape == (4, 64)


def test_loaded_model_trains_further_by_svi(run_dir):
    model, _ = pyrovae.load(str(run_dir), ema=False)
    pyro.clear_param_store()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    svi.step(torch.bernoulli(torch.full((8, 64), 0.3)))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_of_another_model_name_is_an_error_naming_both(run_dir):
    with pytest.raises(ValueError, match="holds a 'vae' model, but model='diffusion' was requested"):
        pyrovae.load(str(run_dir), model="diffusion")


def test_weights_that_do_not_fit_the_config_name_the_entries(run_dir):
    ckpt = load_checkpoint(str(run_dir))
    model = RECIPES["vae"].build(TrainConfig(z_dim=4, hidden=[8]), pyrovae.data.load_dataset("digits"))
    with pytest.raises(
        ValueError, match=r"decoder\.0\.weight has shape \(8, 3\) in the checkpoint, \(8, 4\) in the model"
    ):
        checkpoint.load_model_state(model, ckpt["model"], "run")


def test_a_folder_without_checkpoint_or_a_foreign_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(str(tmp_path))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pyrovae checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))


def test_sample_and_evaluate_commands_take_a_run_folder(run_dir, tmp_path, capsys):
    png = tmp_path / "s.png"
    assert main(["sample", "vae", str(run_dir), "--n", "8", "--out", str(png)]) == 0
    assert png.stat().st_size > 0
    capsys.readouterr()
    assert main(["evaluate", "vae", str(run_dir / "checkpoint.pt"), "--seed", "5"]) == 0
    reported = json.loads(capsys.readouterr().out)
    # the same number as the recipe's evaluation of pyrovae.load's model under the same seed
    model, cfg = pyrovae.load(str(run_dir))
    recipe = RECIPES["vae"]
    x_test = recipe.prepare_test(cfg, pyrovae.data.load_dataset("digits").subset(48, 32).x_test)
    pyro.set_rng_seed(5)
    assert reported["test_elbo"] == recipe.evaluate(cfg, model, x_test)["test_elbo"]
    assert reported["test_size"] == 32


FORMAT1_VAE = os.path.join(
    os.path.dirname(__file__), "data", "format1-vae"
)  # written by pyrovae 0.1 (Pyro's per-parameter optimisers)


def fixture_copy(folder: str, tmp_path) -> str:
    """A copy of a committed run folder: ``evaluate`` writes its report into the folder it reads."""
    return str(shutil.copytree(folder, tmp_path / os.path.basename(folder)))


def test_a_format1_checkpoint_loads_evaluates_and_resumes_with_its_adam_moments(tmp_path, capsys):
    fixture = fixture_copy(FORMAT1_VAE, tmp_path)
    old = torch.load(os.path.join(fixture, "checkpoint.pt"), weights_only=True)
    assert old["format"] == 1
    model, cfg = pyrovae.load(fixture)
    for k, v in model.state_dict().items():
        assert torch.equal(v, old["ema"][k]), k
    assert main(["evaluate", "vae", fixture]) == 0 and "test_elbo" in capsys.readouterr().out

    # restore() maps each parameter's saved moments onto the one optimiser
    from pyrovae.optim import make_optimizer, make_scheduler
    from pyrovae.train import make_averaged_model

    net = RECIPES["vae"].build(cfg, pyrovae.data.load_dataset("digits"))
    optimizer = make_optimizer(cfg.optimizer, net.parameters(), cfg.lr)
    scheduler = make_scheduler(optimizer, cfg, 2)
    averaged = make_averaged_model(net, cfg.ema_decay)
    checkpoint.restore(load_checkpoint(fixture), fixture, net, optimizer, scheduler, averaged)
    for _, (name, p) in enumerate(net.named_parameters()):
        saved = old["optim"][f"vae$$${name}"]["optimizer"]["state"][0]
        assert torch.equal(optimizer.state[p]["exp_avg"], saved["exp_avg"]), name
    assert (
        scheduler.last_epoch == old["step"]
        and optimizer.param_groups[0]["lr"] == old["optim"][f"vae$$${name}"]["optimizer"]["param_groups"][0]["lr"]
    )
    assert int(averaged.n_averaged) == old["step"]

    run = tmp_path / "old"
    run.mkdir()
    for name in ("checkpoint.pt", "config.json"):
        (run / name).write_bytes(open(os.path.join(fixture, name), "rb").read())
    assert main(["train", "vae", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert load_checkpoint(str(run))["format"] == checkpoint.CHECKPOINT_FORMAT


FORMAT1_DIFFUSION_RUN = os.path.join(
    os.path.dirname(__file__), "data", "format1-diffusion"
)  # pyrovae 0.1: a chain without a prior module, fewer schedule tables


def test_a_format1_diffusion_checkpoint_loads_samples_evaluates_and_resumes(tmp_path, capsys):
    fixture = fixture_copy(FORMAT1_DIFFUSION_RUN, tmp_path)
    old = torch.load(os.path.join(fixture, "checkpoint.pt"), weights_only=True)
    assert old["format"] == 1 and "prior.loc" not in old["model"]
    chain, _ = pyrovae.load(fixture)
    for k, v in old["ema"].items():
        if not k.startswith("schedule."):
            assert torch.equal(chain.state_dict()[k], v), k
    # the tables are recomputed from the saved betas, so they are the schedule's own
    assert torch.allclose(chain.schedule.alphas_cumprod, old["ema"]["schedule.alphas_cumprod"], rtol=1e-12)
    assert main(["evaluate", "diffusion", fixture, "--n", "8"]) == 0 and "test_elbo" in capsys.readouterr().out
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "config.json"):
        (run / name).write_bytes(open(os.path.join(fixture, name), "rb").read())
    assert main(["train", "diffusion", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert load_checkpoint(str(run))["format"] == checkpoint.CHECKPOINT_FORMAT


DIFFUSION_TINY = [
    "--data",
    "moons",
    "--train-size",
    "64",
    "--test-size",
    "16",
    "--batch-size",
    "16",
    "--T",
    "4",
    "--hidden",
    "8",
    "--quiet",
    "--eval-every",
    "1",
    "--sample-steps",
    "2",
]
# The diffusion run's state: the importance sampler's history (p(t) leaves uniform in
# epoch 2: 4 steps of 16 draws give every t its 10 values), bf16 autocast, EMA, schedules.
DIFFUSION_FULL = [
    "--time-sampler",
    "importance",
    "--precision",
    "bf16",
    "--ema-decay",
    "0.9",
    "--lr-schedule",
    "exponential",
    "--lr-gamma",
    "0.7",
    "--warmup-steps",
    "3",
    "--grad-clip",
    "20",
]  # cosine depends on --epochs


def test_diffusion_two_epochs_then_resume_equals_four_epochs_bit_for_bit_with_the_sampler_state(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", "diffusion", *DIFFUSION_TINY, *DIFFUSION_FULL, "--epochs", "4", "--out", str(straight)]) == 0
    assert main(["train", "diffusion", *DIFFUSION_TINY, *DIFFUSION_FULL, "--epochs", "2", "--out", str(resumed)]) == 0
    half = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert half["time_sampler"]["count"].min() >= 10  # the importance p(t) is in use from here on
    assert main(["train", "diffusion", "--resume", str(resumed), "--epochs", "4", "--quiet"]) == 0
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k in ("squares", "count"):
        assert torch.equal(a["time_sampler"][k], b["time_sampler"][k]), k
    assert a["scheduler"] == b["scheduler"]
    assert read_rows_without_timing(straight / "metrics.csv") == read_rows_without_timing(resumed / "metrics.csv")


def test_a_resumed_importance_sampler_draws_what_the_saved_one_would(tmp_path):
    """Without its saved history a resumed run would restart p(t) at uniform."""
    from pyrovae.infer.diffusion_elbo import ImportanceTimeSampler

    sampler = ImportanceTimeSampler(history=2)
    sampler.start(3, torch.device("cpu"))
    sampler.update(torch.tensor([1, 1, 2, 2, 3, 3]), torch.tensor([1.0, 1.0, 2.0, 2.0, 8.0, 8.0]))
    again = ImportanceTimeSampler(history=2)
    again.load_state_dict(sampler.state_dict())
    assert torch.equal(again.probs(3, "cpu"), sampler.probs(3, "cpu"))
    assert not torch.allclose(again.probs(3, "cpu"), torch.full((3,), 1 / 3, dtype=torch.float64))
