"""``pyrovae sample|evaluate diffusion|vdm`` with the samplers, the ODE likelihood and the sample scores."""

import json

import numpy as np
import pytest

from pyrovae.cli import main

DIGITS = ["--data", "digits", "--train-size", "64", "--test-size", "16", "--epochs", "1", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    vdm, chain = str(root / "vdm"), str(root / "chain")
    assert main(["train", "vdm", *DIGITS, "--channels", "4", "--sample-steps", "3", "--out", vdm]) == 0
    assert (
        main(["train", "diffusion", *DIGITS, "--T", "8", "--hidden", "8", "--sample-steps", "2", "--out", chain]) == 0
    )
    return {"vdm": vdm, "diffusion": chain}


@pytest.mark.parametrize("model, sampler", [("vdm", "ddim"), ("diffusion", "dpm-solver++"), ("diffusion", "ddim")])
def test_sample_with_a_sampler_writes_the_samples(runs, model, sampler, tmp_path):
    out = str(tmp_path / "s.png")
    assert main(["sample", model, runs[model], "--sampler", sampler, "--steps", "3", "--n", "5", "--out", out]) == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (5, 64) and np.isfinite(x).all()


def test_evaluate_vdm_gives_the_ode_bits_per_dim_beside_the_elbos(runs, capsys):
    args = ["evaluate", "vdm", runs["vdm"], "--n", "4", "--replicates", "2", "--draws", "1", "--likelihood", "ode"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"test_bpd", "test_bpd_se", "test_ode_bpd", "test_ode_bpd_se", "ode_nfe"} <= set(result)
    assert result["ode_nfe"] > 0 and result["ode_dequantised"] and result["ode_n"] == 4


def test_evaluate_diffusion_with_samples_adds_the_judges_scores(runs, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PYROVAE_CACHE", str(tmp_path))
    args = ["evaluate", "diffusion", runs["diffusion"], "--n", "4", "--samples", "20", "--sampler", "ddim"]
    assert main([*args, "--steps", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"fd_judge", "kid_judge", "kid_judge_std", "judge_test_accuracy", "seconds_per_1000_samples"} <= set(result)
    assert result["sampler"] == "ddim" and result["sample_steps"] == 4 and result["scored_samples"] == 20
    assert list((tmp_path / "judges").glob("judge-digits-*.pt"))  # the second evaluation reads it


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["sample", "diffusion", "RUN", "--sampler", "euler"], 2, "invalid choice: 'euler'"),
        (["sample", "diffusion", "RUN", "--sampler", "ddim", "--eta", "2"], 2, "must be a number in [0, 1]"),
        (["sample", "diffusion", "RUN", "--sampler", "ddim", "--steps", "9"], 1, "steps must be"),
        (["sample", "diffusion", "RUN", "--sampler", "dpm-solver++", "--eta", "0.5"], 1, "eta applies to the ddim"),
        # VDM's ancestral sampler ignored these flags (and evaluate --samples scored the unclipped samples)
        (["sample", "vdm", "VDM", "--clip-x0", "--steps", "3"], 1, "clip_x0 is not an option of VDM's ancestral"),
        (["evaluate", "vdm", "VDM", "--samples", "4", "--eta", "0.5", "--steps", "3"], 1, "eta applies to the ddim"),
    ],
)
def test_bad_sampler_flags_are_one_line(runs, argv, code, message, capsys):
    argv = [{"RUN": runs["diffusion"], "VDM": runs["vdm"]}.get(a, a) for a in argv]
    if code == 2:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
    else:
        assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_the_ode_likelihood_of_a_model_without_one_is_one_line(capsys):
    assert main(["evaluate", "vae", "no-such-run", "--likelihood", "ode"]) == 1
    assert "--likelihood ode needs a diffusion model" in capsys.readouterr().err
