"""Issue 24, "nothing lost, nothing silent", second sweep: the twelve cases a
new user's first days found, then the ones found by looking further in the
same places (docs/reliability.md lists them all, with these tests' names).

Every run here is tiny (digits, a few dozen examples, one or two epochs)."""

import copy
import json
import os
import pickle

import numpy as np
import pyro
import pytest
import torch

from pyrovae import checkpoint, runs
from pyrovae.cli import main
from pyrovae.config import TrainConfig
from pyrovae.train import train

TINY = ["--data", "digits", "--train-size", "48", "--test-size", "16", "--batch-size", "16", "--quiet"]
VAE_TINY = [*TINY, "--z-dim", "2", "--hidden", "8"]
SMALL = {
    "vae": ["--z-dim", "2", "--hidden", "8"],
    "hvae": ["--z-dims", "2", "2", "--hidden", "8", "--kl-warmup", "0"],
    "diffusion": [
        "--T",
        "4",
        "--channels",
        "4",
        "--objective",
        "elbo",
        "--variance",
        "beta_tilde",
        "--eval-every",
        "1",
    ],
    "vdm": ["--net", "mlp", "--hidden", "8", "--time", "4"],
}


def tiny(model="vae", **changes) -> TrainConfig:
    small = {
        "vae": dict(z_dim=2, hidden=[8]),
        "hvae": dict(z_dims=[2, 2], hidden=[8], kl_warmup=0),
        "diffusion": dict(T=4, channels=4, objective="elbo", variance="beta_tilde", eval_every=1),
        "vdm": dict(net="mlp", hidden=[8], time="4"),
    }[model]
    values = dict(model=model, data="digits", train_size=48, test_size=16, batch_size=16, epochs=1, quiet=True)
    return TrainConfig(**{**values, **small, **changes})


def digits_spec():
    from pyrovae.data import DataSpec

    return DataSpec("digits", (1, 8, 8))


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def trained(tmp_path, model="vae", name="run", epochs=1, extra=()):
    out = tmp_path / name
    assert main(["train", model, *TINY, *SMALL[model], "--epochs", str(epochs), "--out", str(out), *extra]) == 0
    return out


# --- 1. a hand edit of config.json ------------------------------------------------------------------


def edit_config(out, **changes):
    path = out / "config.json"
    values = json.loads(path.read_text())
    values.update(changes)
    path.write_text(json.dumps(values, indent=2))
    return values


def test_config_json_says_it_is_a_record_and_still_loads(tmp_path):
    out = trained(tmp_path)
    values = json.loads((out / "config.json").read_text())
    assert "record" in values["_note"] and "--resume" in values["_note"]
    assert TrainConfig.from_dict(values).z_dim == 2


def test_a_hand_edit_of_config_json_on_resume_is_named_kept_and_not_applied(tmp_path, capsys):
    out = trained(tmp_path)
    edit_config(out, lr=0.5)
    code, _, err = run_cli(["train", "vae", "--resume", out, "--epochs", "2"], capsys)
    assert code == 0
    line = next(line for line in err.splitlines() if "config.json" in line)
    assert "lr" in line and "0.5" in line and "0.001" in line and "--epochs" in line and "record" in line
    assert checkpoint.load_checkpoint(str(out))["config"]["lr"] == 0.001  # the run used the checkpoint's
    assert json.loads((out / "config-edited.json").read_text())["lr"] == 0.5  # the edit is not lost
    assert json.loads((out / "config.json").read_text())["lr"] == 0.001


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_sample_and_evaluate_name_a_hand_edit_of_config_json(command, tmp_path, capsys):
    out = trained(tmp_path)
    edit_config(out, z_dim=9)
    extra = ["--out", tmp_path / "s.png"] if command == "sample" else []
    code, _, err = run_cli([command, "vae", out, *extra], capsys)
    assert code == 0
    assert "z_dim: config.json 9, the run's checkpoint 2" in err and err.count("config.json") >= 1
    assert json.loads((out / "config.json").read_text())["z_dim"] == 9  # never rewritten by them


def test_an_unreadable_config_json_is_named_not_fatal(tmp_path, capsys):
    out = trained(tmp_path)
    (out / "config.json").write_text("{ broken")
    code, _, err = run_cli(["evaluate", "vae", out], capsys)
    assert code == 0 and "config.json" in err and "not valid JSON" in err


# --- 2. --out into a folder of the user's own files ---------------------------------------------------


def test_out_into_a_folder_of_other_files_is_refused_in_one_line(tmp_path, capsys):
    mine = tmp_path / "my_images"
    mine.mkdir()
    (mine / "cat.png").write_bytes(b"not really")
    before = sorted(os.listdir(mine))
    code, _, err = run_cli(["train", "vae", *VAE_TINY, "--epochs", "1", "--out", mine], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "not a pyrovae run" in err and "cat.png" in err
    assert sorted(os.listdir(mine)) == before


def test_out_into_an_empty_existing_folder_is_fine(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, _ = run_cli(["train", "vae", *VAE_TINY, "--epochs", "1", "--out", tmp_path / "empty"], capsys)
    assert code == 0 and (tmp_path / "empty" / "checkpoint.pt").exists()


# --- 3. --compile with VDM; a run failing before its first checkpoint ----------------------------------


def test_vdm_compile_is_refused_up_front_in_one_line_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "R"
    code, _, err = run_cli(["train", "vdm", *TINY, *SMALL["vdm"], "--epochs", "1", "--compile", "--out", out], capsys)
    assert code == 1 and err.count("\n") == 1 and "--compile" in err and "VDMELBO" in err
    assert not out.exists()


def test_a_run_failing_before_its_first_checkpoint_leaves_a_folder_the_same_command_reuses(
    tmp_path, capsys, monkeypatch
):
    from pyrovae.recipes.vae import VAERecipe

    def broken(self, cfg, model, x_test):
        raise ValueError("evaluation broke")

    out = tmp_path / "R"
    out.mkdir()  # the user made it: it stays, empty
    argv = ["train", "vae", *VAE_TINY, "--epochs", "1", "--out", out]
    with monkeypatch.context() as m:
        m.setattr(VAERecipe, "evaluate", broken)
        code, _, err = run_cli(argv, capsys)
    assert code == 1 and "evaluation broke" in err
    assert os.listdir(out) == []
    assert run_cli(argv, capsys)[0] == 0


def test_compile_of_the_chain_on_the_cpu_says_it_is_slow(tmp_path):
    from pyrovae.compiled import compile_loss
    from pyrovae.config import MODELS
    from pyrovae.train import LossModule

    cfg = tiny("diffusion")
    chain = MODELS["diffusion"].recipe.build(cfg, digits_spec())
    with pytest.warns(UserWarning, match="slower than without --compile on the CPU"):
        compile_loss(LossModule(chain, MODELS["diffusion"].recipe.objective(cfg)))


# --- 4. default run folders ----------------------------------------------------------------------------


def test_default_run_folders_of_runs_started_in_the_same_second_differ(tmp_path, monkeypatch):
    from pyrovae import train as train_module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train_module.time, "strftime", lambda fmt, *a: "20260101-000000")
    first = train(tiny(seed=0)).out_dir
    second = train(tiny(seed=1)).out_dir
    assert first != second and os.path.exists(os.path.join(second, "checkpoint.pt"))
    monkeypatch.setattr(train_module.os, "getpid", lambda: 424242)  # another process, the same second
    assert train_module.run_dir(tiny()) not in (first, second)


# --- 5. torch.save(model) after an SVI step ----------------------------------------------------------


def build(model):
    from pyrovae.config import MODELS

    cfg = tiny(model)
    return MODELS[model].recipe.build(cfg, digits_spec())


def one_svi_step(net, x):
    svi = pyro.infer.SVI(net.model, net.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    svi.step(x)


def model_input(model):
    x = torch.rand(4, 64)
    return x.bernoulli() if model in ("vae", "hvae") else (x * 255).round() / 127.5 - 1


@pytest.mark.parametrize("model", ["vae", "hvae", "diffusion", "vdm"])
def test_a_model_pickles_after_an_svi_step_with_equal_outputs(model, tmp_path):
    net = build(model)
    x = model_input(model)
    one_svi_step(net, x)
    torch.save(net, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    for a, b in zip(net.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    pyro.set_rng_seed(1)
    expected = pyro.infer.Trace_ELBO().loss(net.model, net.guide, x)
    pyro.set_rng_seed(1)
    assert pyro.infer.Trace_ELBO().loss(back.model, back.guide, x) == pytest.approx(expected)
    one_svi_step(net, x)  # the live model trains on
    pickle.dumps(net)


# --- 6. VDM .double() with float32 data ---------------------------------------------------------------


def test_vdm_double_scores_float32_data_as_the_chain_does():
    vdm = build("vdm").double()
    x = model_input("vdm")
    loss = pyro.infer.Trace_ELBO().loss(vdm.model, vdm.guide, x)
    assert np.isfinite(loss)


# --- 7. every bound of every flag -------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "vae", "--seed", "-1"],
        ["train", "vae", "--seed", str(2**32)],
        ["sample", "vae", "run", "--seed", "-1"],
        ["evaluate", "vae", "run", "--seed", "-1"],
        ["bench", "--seed", "-1"],
    ],
    ids=lambda a: " ".join(a),
)
def test_a_seed_out_of_range_is_a_usage_error_naming_the_flag(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--seed" in err and "usage:" in err


# --- 8. sample --out ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["metrics.csv", "samples.png", "loss.png", "reconstructions.png", "checkpoint.pt"])
def test_sample_out_is_checked_before_anything_is_written(target, tmp_path, capsys):
    out = trained(tmp_path)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    code, _, err = run_cli(["sample", "vae", out, "--out", out / target], capsys)
    assert code == 1 and err.count("\n") == 1 and "--out" in err
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


# --- 9. the HVAE's Monte Carlo warning -------------------------------------------------------------------


def test_the_hvae_monte_carlo_note_is_one_line_once_in_the_log(tmp_path, capsys):
    argv = ["train", "hvae", *[a for a in TINY if a != "--quiet"], *SMALL["hvae"], "--epochs", "2"]
    code, out, err = run_cli([*argv, "--out", tmp_path / "loud"], capsys)
    assert code == 0
    both = out + err
    assert both.count("closed-form KL would be biased") == 1
    line = next(line for line in both.splitlines() if "closed-form KL would be biased" in line)
    assert "analytic_elbo.py" not in line and "warnings.warn" not in both
    code, out, err = run_cli([*argv, "--quiet", "--out", tmp_path / "quiet"], capsys)
    assert code == 0 and "closed-form KL" not in out + err


# --- 10. a 1-D .npy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_an_array_of_the_wrong_rank_names_its_file(suffix, tmp_path):
    from pyrovae import data

    path = tmp_path / f"flat{suffix}"
    a = np.zeros(10, dtype=np.float32)
    np.save(path, a) if suffix == ".npy" else np.savez(path, x=a)
    with pytest.raises(ValueError, match="flat" + suffix.replace(".", r"\.")):
        data.load_dataset(str(path))


# --- 11. figures a person can read ---------------------------------------------------------------------


@pytest.fixture
def figures(monkeypatch):
    """Every figure saved, as {file name: the figure's axes}."""
    import matplotlib.figure

    seen = {}
    original = matplotlib.figure.Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        if isinstance(fname, (str, os.PathLike)):
            seen[os.path.basename(str(fname))] = list(self.axes)
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return seen


def test_a_short_diffusion_run_s_loss_png_has_a_training_curve_per_epoch(tmp_path, figures):
    cfg = tiny("diffusion", epochs=3, eval_every=5, out=str(tmp_path / "d"))
    train(cfg)
    axes = figures["loss.png"]
    train_line = next(line for ax in axes for line in ax.get_lines() if line.get_label() == "train_elbo")
    assert list(train_line.get_xdata()) == [1, 2, 3]


def test_a_2d_samples_png_has_axis_labels_and_a_legend(tmp_path, figures):
    cfg = tiny(
        "diffusion", data="moons", T=4, hidden=[8], train_size=64, test_size=32, batch_size=32, out=str(tmp_path / "m")
    )
    train(cfg)
    (ax,) = figures["samples.png"]
    assert ax.get_xlabel() and ax.get_ylabel()
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"test data", "samples"}


# --- 12. a run folder holds everything to sample and evaluate it -------------------------------------------


def test_evaluate_needs_no_data_the_run_saved_its_test_split(tmp_path, capsys):
    source = tmp_path / "faces.npy"
    np.save(source, np.random.default_rng(0).integers(0, 256, size=(64, 8, 8), dtype=np.uint8))
    out = tmp_path / "run"
    argv = ["--data", source, "--batch-size", "16", "--likelihood", "continuous-bernoulli", *SMALL["vae"]]
    assert run_cli(["train", "vae", *argv, "--epochs", "1", "--quiet", "--out", out], capsys)[0] == 0
    code, first, _ = run_cli(["evaluate", "vae", out], capsys)
    assert code == 0
    source.unlink()
    code, second, err = run_cli(["evaluate", "vae", out], capsys)
    assert code == 0, err
    assert json.loads(second) == json.loads(first)


# ======================================================================================================
# The next ones: found by looking as a new user would, in the same places (docs/reliability.md)
# ======================================================================================================

# --- the Python API in one long session ----------------------------------------------------------------

MODELS_ = ["vae", "hvae", "diffusion", "vdm"]


@pytest.mark.parametrize("model", MODELS_)
def test_two_models_of_a_kind_train_on_after_deepcopy_and_double(model):
    a, b = build(model), build(model)
    x = model_input(model)
    one_svi_step(a, x)
    one_svi_step(b, x)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    twin = copy.deepcopy(a)
    one_svi_step(twin, x)
    # the copy trains its own tensors, the original's stay as they were
    assert any(not torch.equal(v, before[k]) for k, v in twin.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())
    wide = copy.deepcopy(a).double()
    one_svi_step(wide, x)  # float32 data into a float64 model
    one_svi_step(copy.deepcopy(a), x.double())  # float64 data into a float32 model
    assert next(wide.parameters()).dtype == torch.float64


@pytest.mark.parametrize("model", MODELS_)
def test_a_submodule_pickles_after_an_svi_step(model):
    net = build(model)
    one_svi_step(net, model_input(model))
    for child in net.children():
        pickle.loads(pickle.dumps(child))


def test_load_then_more_svi_then_torch_save_then_resume_in_one_session(tmp_path):
    import pyrovae

    out = tmp_path / "r"
    train(tiny(out=str(out)))
    vae, cfg = pyrovae.load(str(out))
    x = model_input("vae")
    one_svi_step(vae, x)
    torch.save(vae, tmp_path / "whole.pt")
    assert torch.load(tmp_path / "whole.pt", weights_only=False).z_dim == 2
    assert train(tiny(epochs=2, resume=str(out))).metrics[-1]["epoch"] == 2


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": 2**32}, "seed must be < 4294967296"),
        ({"epochs": 2.0}, "epochs must be an integer >= 1, got 2.0"),
        ({"hidden": 8}, "hidden must be a list, e.g. [8]"),
        ({"device": "gpu"}, "unknown device 'gpu'"),
        ({"model": "vdm", "time": "0"}, "time must be 'continuous' or a number of steps"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_a_bad_config_value_from_python_is_a_clear_error(changes, words):
    model = changes.get("model", "vae")
    with pytest.raises(ValueError) as exc:
        tiny(**changes).check()
    assert words in str(exc.value), (model, exc.value)


def test_numpy_numbers_tuples_and_paths_in_a_config_are_taken_as_python_values(tmp_path):
    cfg = tiny(z_dim=np.int64(3), lr=np.float64(1e-3), hidden=(8,), out=tmp_path / "r")
    assert (type(cfg.z_dim), type(cfg.lr), cfg.hidden, cfg.out) == (int, float, [8], str(tmp_path / "r"))
    train(cfg)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["z_dim"] == 3


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"zdim": 3}, "did you mean 'z_dim'"),
        ({"model": "diffusion", "z_dim": 3}, "'z_dim' is not a field of the diffusion config"),
    ],
    ids=["typo", "another model's field"],
)
def test_an_unknown_config_field_is_named_with_the_nearest(kwargs, words):
    with pytest.raises(TypeError, match=words):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("given", [{"epochs": 1}, None], ids=["dict", "None"])
def test_train_of_something_else_than_a_config_says_what_it_takes(given):
    with pytest.raises(TypeError, match="train takes a TrainConfig"):
        train(given)


# --- hand-edited or partly deleted run folders ---------------------------------------------------------


@pytest.mark.parametrize("gone", ["config.json", "metrics.csv", "loss.png", "model.pt", "test-split.pt"])
def test_a_run_missing_a_file_other_than_its_checkpoint_resumes_and_restores_it(gone, tmp_path, capsys):
    out = trained(tmp_path)
    (out / gone).unlink()
    code, _, err = run_cli(["train", "vae", "--resume", out, "--epochs", "2"], capsys)
    assert code == 0 and (out / gone).exists() and "config.json" not in err


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_a_run_missing_its_test_split_samples_and_evaluates_from_its_data(command, tmp_path, capsys):
    out = trained(tmp_path)
    (out / "test-split.pt").unlink()
    extra = ["--out", tmp_path / "s.png"] if command == "sample" else []
    assert run_cli([command, "vae", out, *extra], capsys)[0] == 0


def test_a_broken_test_split_is_named_in_one_line(tmp_path, capsys):
    out = trained(tmp_path)
    (out / "test-split.pt").write_bytes(b"half")
    code, _, err = run_cli(["evaluate", "vae", out], capsys)
    assert code == 1 and err.count("\n") == 1 and "test-split.pt" in err and "delete it" in err


@pytest.mark.parametrize("command", ["sample", "resume"])
def test_model_pt_given_as_a_checkpoint_says_it_holds_weights_only(command, tmp_path, capsys):
    out = trained(tmp_path)
    argv = (
        ["sample", "vae", out / "model.pt"]
        if command == "sample"
        else ["train", "vae", "--resume", out / "model.pt", "--epochs", "2", "--out", tmp_path / "b"]
    )
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and err.count("\n") == 1 and "weights only" in err and "checkpoint.pt" in err


def test_a_hand_edit_naming_an_unknown_field_is_named(tmp_path, capsys):
    out = trained(tmp_path)
    edit_config(out, learning_rate=0.5)
    code, _, err = run_cli(["train", "vae", "--resume", out, "--epochs", "2"], capsys)
    assert code == 0 and "learning_rate: config.json 0.5, the run's checkpoint (absent)" in err


def test_a_config_json_written_before_a_field_existed_is_not_an_edit(tmp_path, capsys):
    out = trained(tmp_path)
    values = json.loads((out / "config.json").read_text())
    del values["test_particles"], values["_note"]  # as an older pyrovae wrote it
    (out / "config.json").write_text(json.dumps(values))
    code, _, err = run_cli(["train", "vae", "--resume", out, "--epochs", "2"], capsys)
    assert code == 0 and "config.json" not in err and not (out / "config-edited.json").exists()


def test_a_folder_left_with_a_run_s_figures_only_is_refused_naming_them(tmp_path, capsys):
    out = trained(tmp_path)
    for name in ("checkpoint.pt", "config.json", "metrics.csv", "model.pt", "test-split.pt"):
        (out / name).unlink()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(["train", "vae", *VAE_TINY, "--epochs", "1", "--out", out], capsys)
    assert code == 1 and "notes.txt" in err and "not a pyrovae run" in err


def test_a_parent_folder_of_runs_as_out_is_refused(tmp_path, capsys):
    trained(tmp_path, name="a")
    code, _, err = run_cli(["train", "vae", *VAE_TINY, "--epochs", "1", "--out", tmp_path], capsys)
    assert code == 1 and "not a pyrovae run" in err and "'a'" not in err and " a" in err


def test_hidden_files_alone_do_not_make_a_folder_foreign(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"\0")
    assert run_cli(["train", "vae", *VAE_TINY, "--epochs", "1", "--out", out], capsys)[0] == 0


def test_resume_into_a_new_folder_carries_the_test_split(tmp_path, capsys):
    out = trained(tmp_path)
    code, _, _ = run_cli(["train", "vae", "--resume", out, "--epochs", "2", "--out", tmp_path / "b"], capsys)
    assert code == 0 and (tmp_path / "b" / "test-split.pt").exists()


@pytest.mark.parametrize("content", ["garbage", ""], ids=["garbage", "empty"])
def test_a_lock_file_that_names_no_process_says_so(content, tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / runs.LOCK).write_text(content)
    code, _, err = run_cli(["train", "vae", *VAE_TINY, "--epochs", "1", "--out", out], capsys)
    assert code == 1 and "names no process" in err and "None" not in err
    assert (out / runs.LOCK).read_text() == content  # never taken silently


# --- several runs, and runs stopped half-way -----------------------------------------------------------


def test_a_sample_failing_half_way_keeps_the_previous_samples_and_leaves_no_part(tmp_path, capsys, monkeypatch):
    import pyrovae

    out = trained(tmp_path)
    model_class = type(pyrovae.load(str(out))[0])
    argv = ["sample", "vae", out, "--n", "20", "--chunk-size", "10"]
    assert run_cli(argv, capsys)[0] == 0
    before = (out / "samples-0.npy").read_bytes()
    calls = []
    real = model_class.sample

    def fails_second(self, n, *args, **kwargs):
        calls.append(n)
        if len(calls) % 2 == 0:  # the second chunk of every run
            raise ValueError("the second chunk broke")
        return real(self, n, *args, **kwargs)

    monkeypatch.setattr(model_class, "sample", fails_second)
    code, _, err = run_cli([*argv, "--seed", "1"], capsys)
    assert code == 1 and "second chunk" in err
    code, _, _ = run_cli(argv, capsys)  # seed 0 again: the second chunk breaks, the first file stays whole
    assert code == 1 and (out / "samples-0.npy").read_bytes() == before
    assert not [n for n in os.listdir(out) if checkpoint.TMP_SUFFIX in n]


def test_a_run_stopped_by_a_nan_in_its_first_epoch_leaves_a_folder_the_same_command_reuses(
    tmp_path, capsys, monkeypatch
):
    from pyrovae import train as training

    argv = ["train", "vae", *VAE_TINY, "--epochs", "1", "--out", tmp_path / "r"]
    with monkeypatch.context() as m:
        m.setattr(training, "train_step", _raise_nonfinite)
        code, _, err = run_cli(argv, capsys)
    assert code == 1 and "no epoch had finished" in err
    assert not (tmp_path / "r").exists()
    assert run_cli(argv, capsys)[0] == 0


def _raise_nonfinite(*args, **kwargs):
    from pyrovae.train import NonFiniteLossError

    raise NonFiniteLossError("the loss is nan")


def test_running_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    from pyrovae.recipes.vae import VAERecipe

    def oom(self, cfg, model, x_test):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 128000000000 bytes. Error code 12 (Cannot allocate memory)\nframe #0: c10::..."
        )

    monkeypatch.setattr(VAERecipe, "evaluate", oom)
    code, _, err = run_cli(["train", "vae", *VAE_TINY, "--epochs", "1", "--out", tmp_path / "r"], capsys)
    assert code == 1 and err.count("\n") == 1 and "out of memory" in err and "--test-particles" in err
    assert not (tmp_path / "r").exists()


# --- every flag at and beyond its bounds -------------------------------------------------------------------


def bounded_flags():
    """(model, flag, value at the bound, value beyond it) for every bounded field of every model's config."""
    import dataclasses

    from pyrovae.config import MODELS

    cases = {}
    for model, entry in MODELS.items():
        for f in dataclasses.fields(entry.config):
            meta = f.metadata
            if not meta.get("cli", True) or not any(k in meta for k in ("ge", "gt", "le", "lt")):
                continue
            whole = "int" in f.type and "float" not in f.type
            for key in ("ge", "gt", "le", "lt"):
                if key not in meta:
                    continue
                bound = meta[key]
                step = 1 if whole else 1e-6 * max(1.0, abs(bound) if bound != float("inf") else 1.0)
                if bound == float("inf"):
                    at, beyond = "1e300", "inf"
                elif key == "ge":
                    at, beyond = bound, bound - step
                elif key == "gt":
                    at, beyond = (bound + step if whole else bound + step), bound
                elif key == "le":
                    at, beyond = bound, bound + step
                else:
                    at, beyond = bound - step, bound
                flag = "--T" if f.name == "T" else "--" + f.name.replace("_", "-")
                cases.setdefault((flag, key), (model, flag, str(at), str(beyond)))
    return list(cases.values())


@pytest.mark.parametrize("model, flag, at, beyond", bounded_flags(), ids=lambda v: str(v))
def test_every_bounded_flag_takes_its_bound_and_refuses_beyond_it_with_exit_2(model, flag, at, beyond, capsys):
    from pyrovae.cli import build_parser

    build_parser().parse_args(["train", model, flag, at])
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["train", model, flag, beyond])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {flag}" in err


RUN_FLAGS = [
    (["sample", "vae", "r", "--n"], "1", "0"),
    (["sample", "vae", "r", "--chunk-size"], "1", "0"),
    (["sample", "diffusion", "r", "--steps"], "1", "0"),
    (["sample", "vdm", "r", "--steps"], "1", "0"),
    (["sample", "vae", "r", "--seed"], "0", "-1"),
    (["evaluate", "vae", "r", "--test-particles"], "1", "0"),
    (["evaluate", "vae", "r", "--iwae-k"], "0", "-1"),
    (["evaluate", "diffusion", "r", "--n"], "1", "0"),
    (["evaluate", "diffusion", "r", "--chunk-size"], "1", "0"),
    (["evaluate", "vae", "r", "--seed"], str(2**32 - 1), str(2**32)),
    (["evaluate", "vdm", "r", "--n"], "1", "0"),
    (["evaluate", "vdm", "r", "--replicates"], "1", "0"),
    (["evaluate", "vdm", "r", "--draws"], "1", "0"),
    (["evaluate", "diffusion", "r", "--samples"], "2", "1"),
    (["evaluate", "vdm", "r", "--samples"], "0", "-1"),
    (["sample", "diffusion", "r", "--eta"], "1", "1.5"),
    (["sample", "vdm", "r", "--eta"], "0", "-0.1"),
    (["bench", "--repeats"], "1", "0"),
    (["bench", "--threads"], "1", "0"),
    (["bench", "--seed"], "0", "-1"),
]


@pytest.mark.parametrize("argv, at, beyond", RUN_FLAGS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_every_bounded_flag_of_sample_evaluate_and_bench_takes_its_bound_and_refuses_beyond(argv, at, beyond, capsys):
    from pyrovae.cli import build_parser

    build_parser().parse_args([*argv, at])
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*argv, beyond])
    assert exc.value.code == 2 and f"argument {argv[-1]}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "vae", "--device", "gpu"],
        ["sample", "vae", "r", "--device", "gpu"],
        ["evaluate", "vae", "r", "--device", "cuda0"],
        ["bench", "--device", "tpu"],
        ["train", "vdm", "--time", "0"],
        ["train", "vdm", "--time", "-3"],
        ["train", "vdm", "--time", "abc"],
        ["train", "vae", "--lr", "1e-400"],
        ["train", "vae", "--epochs", "none"],
        ["train", "vae", "--test-fraction", "1"],
        ["train", "vae", "--hidden"],
    ],
    ids=lambda a: " ".join(a),
)
def test_a_misspelt_device_or_time_and_odd_numbers_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "usage:" in err and argv[-1 if argv[-1].startswith("--") else -2] in err


def test_a_device_that_is_spelt_right_but_absent_is_a_runtime_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is there")
    code, _, err = run_cli(["train", "vae", *VAE_TINY, "--device", "cuda:1", "--out", tmp_path / "r"], capsys)
    assert code == 1 and "no CUDA GPU" in err and not (tmp_path / "r").exists()


# --- the new features as they land: labels (M2), early stopping ------------------------------------------


def test_sample_of_an_m2_run_says_it_cannot_draw_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = trained(tmp_path, epochs=1, extra=["--labelled", "20", "--kl-warmup", "0"])
    before = sorted(os.listdir(out))
    code, _, err = run_cli(["sample", "vae", out], capsys)
    assert code == 1 and err.count("\n") == 1 and "has no sample method" in err and "pyrovae evaluate vae" in err
    assert sorted(os.listdir(out)) == before


def test_an_m2_run_evaluates_from_its_saved_test_split_and_from_its_data(tmp_path, capsys):
    out = trained(tmp_path, epochs=1, extra=["--labelled", "20", "--kl-warmup", "0"])
    code, first, _ = run_cli(["evaluate", "vae", out], capsys)
    (out / "test-split.pt").unlink()
    code2, second, _ = run_cli(["evaluate", "vae", out], capsys)
    assert code == code2 == 0
    assert json.loads(first.splitlines()[-1]) == json.loads(second.splitlines()[-1])


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--early-stopping", "2", "--held-out", "48"], "held_out must be < the 48 training examples"),
        (["--held-out", "5"], "it needs early_stopping"),
        (["--labelled", "5"], "labelled must be at least one per class (10), got 5"),
        (["--labelled", "1000"], "labelled must be at most the training set's size (48)"),
    ],
    ids=["held-out all", "held-out alone", "labelled < classes", "labelled > data"],
)
def test_early_stopping_and_label_settings_that_cannot_work_are_one_line_and_leave_no_folder(
    extra, words, tmp_path, capsys
):
    code, _, err = run_cli(["train", "vae", *VAE_TINY, "--epochs", "1", *extra, "--out", tmp_path / "r"], capsys)
    assert code == 1 and err.count("\n") == 1 and words in err and not (tmp_path / "r").exists()


# --- more of the same, found late: another run's files, a hand-edited metrics.csv ---------------------------


def test_sample_out_into_another_run_s_folder_under_its_names_is_refused(tmp_path, capsys):
    a, b = trained(tmp_path, name="a"), trained(tmp_path, name="b")
    before = (b / "samples.png").read_bytes()
    code, _, err = run_cli(["sample", "vae", a, "--out", b / "samples.png"], capsys)
    assert code == 1 and "would replace the run in" in err and (b / "samples.png").read_bytes() == before


def test_a_hand_edit_of_metrics_csv_is_kept_aside_on_resume_and_said(tmp_path, capsys):
    out = trained(tmp_path)
    edited = (out / "metrics.csv").read_text().replace("\n", ",my note\n", 1)
    (out / "metrics.csv").write_text(edited)
    code, _, err = run_cli(["train", "vae", "--resume", out, "--epochs", "2"], capsys)
    assert code == 0 and "metrics-edited.csv" in err
    assert (out / "metrics-edited.csv").read_text() == edited
    assert "my note" not in (out / "metrics.csv").read_text()


def test_a_resume_after_an_unedited_metrics_csv_keeps_no_copy(tmp_path, capsys):
    out = trained(tmp_path)
    assert run_cli(["train", "vae", "--resume", out, "--epochs", "2"], capsys)[0] == 0
    assert not (out / "metrics-edited.csv").exists()
