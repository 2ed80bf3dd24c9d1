"""``pyrovae evaluate MODEL RUN --samples N [--guidance W]`` (issue 25): the sample
scores of every model, and of a run trained with ``--conditional`` the share of
its samples the judge puts in the class asked for."""

import json

import pytest
import torch
from test_conditional import SMALL, TINY

from pyrovae.cli import main

BOUND = {"vae": [], "hvae": [], "diffusion": ["--n", "4"], "vdm": ["--n", "4", "--replicates", "2", "--draws", "1"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny conditional run of each model, and an unconditional VAE and chain."""
    folder = tmp_path_factory.mktemp("conditional-evaluate")
    for model, flags in SMALL.items():
        assert main(["train", model, "--conditional", *TINY, *flags, "--out", str(folder / model)]) == 0
    for model in ("vae", "diffusion"):
        assert main(["train", model, *TINY, *SMALL[model], "--out", str(folder / f"plain-{model}")]) == 0
    return folder


@pytest.fixture(scope="module")
def judge(tmp_path_factory):
    """A small judge of digits (a few seconds to train), cached for the module."""
    from pyrovae.evaluate.judge import JudgeConfig, judge_for

    return judge_for("digits", str(tmp_path_factory.mktemp("judges")), JudgeConfig(epochs=4, width=8, features=16))


@pytest.fixture
def small_judge(judge, monkeypatch):
    """``evaluate`` scores with the small judge, not digits' full one."""
    monkeypatch.setattr("pyrovae.evaluate.judge.judge_for", lambda ds: judge)
    return judge


def evaluate(argv, capsys) -> dict:
    assert main(["evaluate", *argv]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("model", list(SMALL))
def test_evaluate_samples_of_a_conditional_run_gives_the_class_accuracy(model, runs, small_judge, capsys):
    steps = ["--steps", "2"] if model in ("diffusion", "vdm") else []
    result = evaluate([model, str(runs / model), "--samples", "20", *steps, *BOUND[model]], capsys)
    assert 0 <= result["sample_class_accuracy"] <= 1 and result["scored_samples"] == 20
    assert result["judge_test_accuracy"] == small_judge.test_accuracy
    assert {"test_elbo", "fd_judge", "kid_judge", "seconds_per_1000_samples"} <= set(result)
    if model in ("diffusion", "vdm"):
        assert result["guidance"] == 0.0 and result["sampler"] == "ancestral" and result["sample_steps"] == 2
    else:
        assert result["guidance"] is None and "sampler" not in result


def test_evaluate_samples_of_an_unconditional_vae_gives_its_scores(runs, small_judge, capsys):
    result = evaluate(["vae", str(runs / "plain-vae"), "--samples", "20"], capsys)
    assert {"test_elbo", "fd_judge", "kid_judge", "judge_test_accuracy"} <= set(result)
    assert result["scored_samples"] == 20 and "sample_class_accuracy" not in result


def test_guidance_reaches_the_conditional_chains_sampler(runs, small_judge, capsys, monkeypatch):
    from pyrovae.evaluate import commands

    seen = []

    def spy(model, k, steps, sampler, **kw):
        seen.append(model.net.guidance)
        return torch.zeros(k, model.x_dim)

    monkeypatch.setattr(commands, "sample", spy)
    result = evaluate(["diffusion", str(runs / "diffusion"), "--samples", "4", "--guidance", "2.5", "--n", "4"], capsys)
    assert result["guidance"] == 2.5 and seen == [2.5]


def test_samples_are_balanced_over_the_classes_in_class_order():
    from pyrovae.recipes.conditional import balanced_labels

    assert balanced_labels(25, 10).tolist() == [c for c in range(10) for _ in range(3 if c < 5 else 2)]
    assert torch.equal(balanced_labels(30, 10), torch.arange(10).repeat_interleave(3))


def images_of(x_test, y_test, y: torch.Tensor) -> torch.Tensor:
    """For each label in ``y``, a test image of that class (the i-th asked for class c: its i-th, cycling)."""
    out = torch.empty(len(y), x_test.shape[1])
    for c in y.unique():
        pool = x_test[y_test == c]
        where = (y == c).nonzero().squeeze(1)
        out[where] = pool[torch.arange(len(where)) % len(pool)].float()
    return out


@pytest.mark.parametrize("model", ["vae", "diffusion"])
@pytest.mark.parametrize("shift", [0, 1])
def test_class_accuracy_is_the_judges_on_samples_of_the_asked_class(
    model, shift, runs, small_judge, capsys, monkeypatch
):
    """Samples of class c are test images of class c + shift: the reported share is
    the judge's accuracy on those against the asked labels, high when shift = 0
    and low when the samples' classes are off by one."""
    from pyrovae import data as datasets
    from pyrovae.evaluate import commands
    from pyrovae.hvae import HVAE
    from pyrovae.recipes.conditional import balanced_labels
    from pyrovae.recipes.diffusion import from_chain_space, to_chain_space

    ds = datasets.load_dataset("digits")
    x_test, y_test = torch.as_tensor(ds.x_test[:]), ds.y_test
    asked = []

    def fake(y: torch.Tensor) -> torch.Tensor:
        asked.append(y.cpu())
        return images_of(x_test, y_test, (y.cpu() + shift) % 10)

    if model == "vae":
        monkeypatch.setattr(HVAE, "sample", lambda self, n, y=None: fake(y))
    else:
        monkeypatch.setattr(commands, "sample", lambda m, k, steps, sampler, **kw: to_chain_space(fake(m.net.y)))
    n = 300
    result = evaluate([model, str(runs / model), "--samples", str(n), *BOUND[model]], capsys)
    y = balanced_labels(n, 10)
    assert torch.equal(torch.cat(asked), y)
    images = images_of(x_test, y_test, (y + shift) % 10)
    expected = small_judge.accuracy(images if model == "vae" else from_chain_space(to_chain_space(images)), y)
    assert result["sample_class_accuracy"] == pytest.approx(expected, abs=1e-12)
    if shift == 0:
        assert expected > 0.5
    else:
        assert expected < 0.25


@pytest.mark.parametrize(
    "run, flags, message",
    [
        ("vae", ["--samples", "4", "--guidance", "1"], "--guidance is classifier-free guidance of the chain and VDM"),
        ("hvae", ["--samples", "4", "--guidance", "0"], "a hvae has none"),
        ("plain-diffusion", ["--samples", "4", "--guidance", "1"], "--guidance needs a run trained with --conditional"),
        ("diffusion", ["--guidance", "1"], "--guidance weighs the samples that --samples N scores"),
    ],
)
def test_bad_guidance_on_evaluate_is_one_line(run, flags, message, runs, capsys):
    model = run.removeprefix("plain-")
    assert main(["evaluate", model, str(runs / run), *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_negative_guidance_on_evaluate_is_a_usage_error(runs, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "diffusion", str(runs / "diffusion"), "--samples", "4", "--guidance", "-1"])
    assert exit_.value.code == 2 and "--guidance: must be a number w >= 0" in capsys.readouterr().err


def test_samples_of_an_m2_run_are_refused_in_one_line(tmp_path, capsys):
    out = str(tmp_path / "m2")
    assert main(["train", "vae", *TINY, *SMALL["vae"], "--labelled", "20", "--kl-warmup", "0", "--out", out]) == 0
    capsys.readouterr()
    assert main(["evaluate", "vae", out, "--samples", "4"]) == 1
    err = capsys.readouterr().err
    assert "--samples needs a model that samples" in err and len(err.strip().splitlines()) == 1


def test_the_samples_are_those_of_seed(runs, small_judge, capsys):
    argv = ["vae", str(runs / "vae"), "--samples", "20"]
    first, again, other = (evaluate([*argv, "--seed", seed], capsys) for seed in ("0", "0", "1"))
    assert first["fd_judge"] == again["fd_judge"] != other["fd_judge"]
