import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from pyrovae.cli import main

TINY = ["--train-size", "64", "--test-size", "32", "--batch-size", "32", "--epochs", "2", "--z-dim", "4", "--hidden", "16", "--test-particles", "2", "--quiet"]
OUTPUTS = ["config.json", "metrics.csv", "model.pt", "checkpoint.pt", "loss.png", "samples.png", "reconstructions.png"]


def test_train_vae_writes_every_output(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "vae", *TINY, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == sorted(OUTPUTS)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_elbo", "test_elbo", "seconds"} <= set(rows[0])
    assert all(float(r["test_elbo"]) < 0 for r in rows)


def test_config_json_round_trips_the_flags(tmp_path):
    from pyrovae.train import TrainConfig

    out = tmp_path / "run"
    main(["train", "vae", *TINY, "--seed", "7", "--out", str(out)])
    cfg = TrainConfig(**json.loads((out / "config.json").read_text()))
    assert (cfg.seed, cfg.z_dim, cfg.hidden, cfg.train_size, cfg.out) == (7, 4, [16], 64, str(out))


def test_saved_parameters_load_into_a_fresh_vae(tmp_path):
    from pyrovae.vae import build_vae

    out = tmp_path / "run"
    main(["train", "vae", *TINY, "--out", str(out)])
    vae = build_vae(784, 4, (16,))
    vae.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert vae.sample(3).shape == (3, 784)


def test_same_seed_gives_the_same_run(tmp_path):
    read = lambda p: [r["test_elbo"] for r in csv.DictReader(open(p / "metrics.csv"))]
    main(["train", "vae", *TINY, "--out", str(tmp_path / "a")])
    main(["train", "vae", *TINY, "--out", str(tmp_path / "b")])
    assert read(tmp_path / "a") == read(tmp_path / "b")


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "vae", "--epochs", "0"],
        ["train", "vae", "--lr", "-1"],
        ["train", "vae", "--elbo", "nope"],
        ["train", "gan"],
        [],
    ],
)
def test_bad_flags_give_usage_and_exit_code_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.slow
def test_python_m_pyrovae_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "pyrovae", "train", "vae", *TINY, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "test ELBO" in proc.stdout
    assert sorted(os.listdir(out)) == sorted(OUTPUTS)
