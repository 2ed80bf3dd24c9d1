import csv
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from pyrovae.cli import build_parser, config_from_args, main, synopsis
from pyrovae.config import MODELS, TrainConfig

TINY = [
    "--train-size",
    "64",
    "--test-size",
    "32",
    "--batch-size",
    "32",
    "--epochs",
    "2",
    "--z-dim",
    "4",
    "--hidden",
    "16",
    "--test-particles",
    "2",
    "--quiet",
]
DIGITS = ["--data", "digits", *TINY]  # 8x8 images: no 30 s MNIST load per test
OUTPUTS = [
    "config.json",
    "metrics.csv",
    "model.pt",
    "checkpoint.pt",
    "test-split.pt",
    "loss.png",
    "samples.png",
    "reconstructions.png",
]


def test_train_vae_writes_every_output(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "vae", *DIGITS, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == sorted(OUTPUTS)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_elbo", "test_elbo", "seconds"} <= set(rows[0])
    assert all(float(r["test_elbo"]) < 0 for r in rows)


def test_config_json_round_trips_the_flags(tmp_path):
    from pyrovae.config import TrainConfig

    out = tmp_path / "run"
    main(["train", "vae", *DIGITS, "--seed", "7", "--out", str(out)])
    cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert (cfg.seed, cfg.z_dim, cfg.hidden, cfg.train_size, cfg.out) == (7, 4, [16], 64, str(out))


def test_saved_parameters_load_into_a_fresh_vae(tmp_path):
    from pyrovae.vae import build_vae

    out = tmp_path / "run"
    main(["train", "vae", *DIGITS, "--out", str(out)])
    vae = build_vae(64, 4, (16,))
    vae.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    assert vae.sample(3).shape == (3, 64)


def test_same_seed_gives_the_same_run(tmp_path):
    def read(p):
        return [r["test_elbo"] for r in csv.DictReader(open(p / "metrics.csv"))]

    main(["train", "vae", *DIGITS, "--out", str(tmp_path / "a")])
    main(["train", "vae", *DIGITS, "--out", str(tmp_path / "b")])
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
        [sys.executable, "-m", "pyrovae", "train", "vae", *DIGITS, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "test ELBO" in proc.stdout
    assert sorted(os.listdir(out)) == sorted(OUTPUTS)


# ---- flags generated from the configs (issue 13 item 5, CLI side) ----


def leaf_parser(*names):
    parser = build_parser()
    for name in names:
        parser = next(a for a in parser._actions if a.dest in ("command", "model")).choices[name]
    return parser


@pytest.mark.parametrize("model", list(MODELS))
def test_default_flags_give_the_config_python_gives(model):
    """``pyrovae train MODEL`` with no flags and ``TrainConfig(model=MODEL)``
    are the same config, before and after the data-dependent defaults."""
    from pyrovae.config import resolve

    cli = config_from_args(build_parser().parse_args(["train", model]))
    assert cli == TrainConfig(model=model) and resolve(cli) == resolve(TrainConfig(model=model))


@pytest.mark.parametrize("model", list(MODELS))
def test_every_config_field_is_a_flag_with_the_config_s_choices(model):
    config = MODELS[model].config
    actions = {a.dest: a for a in leaf_parser("train", model)._actions if a.dest not in ("help", "debug")}
    fields = {f.name: f for f in dataclasses.fields(config) if f.metadata.get("cli", True)}
    assert set(actions) == set(fields)
    for name, f in fields.items():
        assert actions[name].choices == f.metadata.get("choices"), name


def test_flag_values_become_config_values():
    args = build_parser().parse_args(
        [
            "train",
            "diffusion",
            "--T",
            "7",
            "--hidden",
            "8",
            "8",
            "--ema-decay",
            "none",
            "--no-validate",
            "--objective",
            "elbo",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.T, cfg.hidden, cfg.ema_decay, cfg.validate, cfg.objective) == (7, [8, 8], None, False, "elbo")


@pytest.mark.parametrize(
    "command", [["train", "vae"], ["train", "diffusion"], ["sample", "vae"], ["evaluate", "diffusion"], ["bench"]]
)
def test_help_shows_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    options = re.split(r"\n  (?=-)", text.split("options:", 1)[1])
    assert len(options) > 3
    for option in options:
        assert option.count("default") <= 1, option
    assert "default: None" not in text


# ---- resume takes the run's own settings (issue 17 item 13) ----

DIFFUSION = [
    "--data",
    "moons",
    "--train-size",
    "64",
    "--test-size",
    "32",
    "--batch-size",
    "32",
    "--T",
    "4",
    "--hidden",
    "8",
    "--sample-steps",
    "2",
    "--quiet",
]


def test_a_diffusion_run_with_its_own_settings_resumes_with_no_flags_but_epochs(tmp_path):
    out = str(tmp_path / "run")
    assert (
        main(
            [
                "train",
                "diffusion",
                *DIFFUSION,
                "--epochs",
                "1",
                "--schedule",
                "cosine",
                "--lr",
                "1e-3",
                "--ema-decay",
                "none",
                "--out",
                out,
            ]
        )
        == 0
    )
    assert main(["train", "diffusion", "--epochs", "2", "--resume", out]) == 0
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and (ckpt["config"]["schedule"], ckpt["config"]["T"], ckpt["config"]["lr"]) == (
        "cosine",
        4,
        1e-3,
    )


def test_a_resume_changing_a_setting_names_it(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "vae", *DIGITS, "--epochs", "1", "--out", out]) == 0
    assert main(["train", "vae", "--epochs", "2", "--z-dim", "7", "--resume", out]) == 1
    assert "z_dim: checkpoint 4, requested 7" in capsys.readouterr().err


# ---- polish a user sees (issue 17 items 17, 18) ----


def test_logs_that_are_not_a_terminal_hold_no_bars_or_cursor_moves(tmp_path, capsys):
    argv = ["train", "vae", *[a for a in DIGITS if a != "--quiet"], "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "\r" not in text and "\x1b[" not in text
    assert len(re.findall(r"^epoch \d+:", captured.out, re.M)) == 2  # one line per epoch


def test_a_kl_warmup_longer_than_the_run_is_warned(tmp_path, capsys):
    assert main(["train", "vae", *DIGITS, "--kl-warmup", "10", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "--kl-warmup 10" in err and "beta = 0.1" in err


def test_an_error_inside_the_model_is_one_line_and_debug_shows_the_rest(tmp_path, capsys, monkeypatch):
    """Pyro appends the trace's shapes to an error raised in a model: the CLI
    prints the first line; --debug raises the error itself."""
    from pyrovae.recipes.vae import VAERecipe

    monkeypatch.setattr(VAERecipe, "check_data", lambda self, cfg, x: None)  # let the model's own check see grey levels
    argv = ["train", "vae", *DIGITS, "--binarize", "none", "--out", str(tmp_path / "a")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be binary" in err and "--debug" in err and "Trace Shapes" not in err
    with pytest.raises(ValueError, match="Trace Shapes"):
        main(["--debug", *argv[:-1], str(tmp_path / "b")])


def test_tensorboard_without_the_package_writes_no_run_folder(tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401

        pytest.skip("the tensorboard package is installed here")
    except ImportError:
        pass
    assert main(["train", "vae", *DIGITS, "--tensorboard", "--out", str(tmp_path / "tb")]) == 1
    assert "tensorboard package" in capsys.readouterr().err and not (tmp_path / "tb").exists()


# ---- sample: bounded memory, arrays to .npy (issue 17 item 14) ----


def peak_rss_mb(call) -> float:
    """Peak resident memory while ``call()`` runs, above the resident memory
    before it, in MB (Linux: the kernel's high-water mark, reset first)."""

    def status(key):
        return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    call()
    return (status("VmHWM") - before) / 1024


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "run"
    assert main(["train", "vae", *DIGITS[:-1], "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    return out


def test_sample_writes_every_sample_as_npy_and_a_grid_as_png(digits_run, capsys):
    import numpy as np

    assert (
        main(["sample", "vae", str(digits_run), "--n", "150", "--chunk-size", "64", "--out", str(digits_run / "s.png")])
        == 0
    )
    x = np.load(digits_run / "s.npy")
    assert x.shape == (150, 64) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert len(np.unique(x, axis=0)) == 150  # every chunk is new draws
    assert (digits_run / "s.png").exists() and "the first 64 of 150" in capsys.readouterr().out


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_sample_memory_does_not_grow_with_n(digits_run):
    """n = 5,000 drew a 5,000-image grid before: about 140 MB above the
    process's memory on digits; in chunks it is a few MB."""
    main(["sample", "vae", str(digits_run), "--n", "64"])  # imports and font caches first
    peak = peak_rss_mb(lambda: main(["sample", "vae", str(digits_run), "--n", "5000"]))
    assert peak < 40, f"sampling 5,000 took {peak:.0f} MB"


def test_readme_synopsis_is_the_parsers_own():
    """README's command-line synopsis is what ``pyrovae.cli.synopsis()`` generates from the parser: a flag that is
    added, renamed or removed fails here until README says so (paste ``python -c "from pyrovae.cli import
    synopsis; print(synopsis())"``, indented by four spaces, under the synopsis marker)."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    marker = readme.index("<!-- synopsis:")
    block = readme[readme.index("\n", marker) + 1 :].split("\n\n", 1)[0]
    assert textwrap.dedent(block) == synopsis()
