"""Every mistake a user can make ends in a clear error, and no fault loses a run's work.

Bad inputs are a table of (what is wrong, call, error type, words the message
must hold): the argument's name, what was expected and what was given. The
faults (a NaN loss, SIGKILL during a save, a full disk, a crafted pickle) get
one test each. docs/reliability.md lists the same cases.
"""

import gzip
import json
import multiprocessing
import os
import random
import signal
import socket
import threading
import time

import pyro
import pyro.distributions as dist
import pytest
import torch
from tqdm.auto import tqdm

from pyrovae import checkpoint, data, runs
from pyrovae.checkpoint import load_checkpoint
from pyrovae.cli import main
from pyrovae.config import TrainConfig
from pyrovae.diffusion.schedule import NoiseSchedule
from pyrovae.infer.diffusion_elbo import DiffusionELBO
from pyrovae.train import train
from pyrovae.vae import build_vae

TINY = [
    "--data",
    "digits",
    "--train-size",
    "48",
    "--test-size",
    "16",
    "--batch-size",
    "16",
    "--z-dim",
    "2",
    "--hidden",
    "8",
    "--quiet",
]


def tiny_config(out, **changes) -> TrainConfig:
    values = dict(
        data="digits", train_size=48, test_size=16, batch_size=16, hidden=[8], epochs=2, quiet=True, out=str(out)
    )
    if changes.get("model", "vae") == "vae":
        values["z_dim"] = 2  # each model's config has only its own fields
    return TrainConfig(**{**values, **changes})


def vae64():
    return build_vae(64, 2, (8,))


def chain64():
    from pyrovae.diffusion.chain import DiffusionChain
    from pyrovae.diffusion.denoisers import TimeMLP

    return DiffusionChain(TimeMLP(64, [8]), NoiseSchedule.from_name("linear", 4), 64, "discretised")


def save(path, obj):
    torch.save(obj, path)
    return str(path)


def with_nan(x):
    x = x.clone()
    x[0, 0] = float("nan")
    return x


def idx_bytes(magic=b"\x00\x00\x08\x01", n=4, payload=None):
    return magic + n.to_bytes(4, "big") + (bytes(n) if payload is None else payload)


def write(path, raw):
    path.write_bytes(raw)
    return str(path)


def unwritable_out(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    return tiny_config(blocker / "run")


def other_model_checkpoint(tmp_path):
    assert main(["train", "vae", *TINY, "--epochs", "1", "--out", str(tmp_path / "v")]) == 0
    return str(tmp_path / "v")


def resume_changed(tmp_path):
    train(tiny_config(tmp_path / "r", epochs=1))
    return tiny_config(tmp_path / "r", epochs=3, z_dim=3, resume=str(tmp_path / "r"))


class WrongEventSize(torch.nn.Module):
    """An encoder (or prior) whose distributions have 3 latent dimensions, not the VAE's 2."""

    def forward(self, x=None):
        return dist.Normal(torch.zeros(3 if x is None else (len(x), 3)), 1.0).to_event(1)


def elbo_loss(vae, x):
    return pyro.infer.Trace_ELBO().loss(vae.model, vae.guide, x)


def finished_run(tmp_path, name="run", **changes):
    out = tmp_path / name
    train(tiny_config(out, epochs=1, **changes))
    return out


def locked_by(folder, host, pid):
    os.makedirs(folder, exist_ok=True)
    (folder / runs.LOCK).write_text(json.dumps({"host": host, "pid": pid}))
    return folder


def gzip_bytes(raw):
    return gzip.compress(raw)


# (case, call(tmp_path), error type, words the message must contain)
BAD_INPUTS = [
    # data
    (
        "data: 28x28 images for an 8x8 model",
        lambda p: vae64().model(torch.rand(4, 784)),
        ValueError,
        ["x must have shape", "64", "(4, 784)"],
    ),
    ("data: empty batch", lambda p: vae64().model(torch.rand(0, 64)), ValueError, ["empty"]),
    (
        "data: NaN values",
        lambda p: vae64().model(with_nan(torch.rand(4, 64).round())),
        ValueError,
        ["x", "finite", "nan"],
    ),
    (
        "data: inf values",
        lambda p: vae64().guide(torch.full((4, 64), float("inf"))),
        ValueError,
        ["x", "finite", "inf"],
    ),
    (
        "data: grey levels for a Bernoulli likelihood",
        lambda p: vae64().model(torch.rand(4, 64)),
        ValueError,
        ["x", "binary", "--binarize"],
    ),
    (
        "data: uint8 images unscaled",
        lambda p: vae64().model(torch.zeros(4, 64, dtype=torch.uint8)),
        TypeError,
        ["x", "float", "uint8"],
    ),
    ("data: not a tensor", lambda p: vae64().model([[0.0] * 64]), TypeError, ["x", "torch.Tensor", "list"]),
    (
        "data: another device than the model",
        lambda p: vae64().model(torch.rand(4, 64, device="meta")),
        ValueError,
        ["x is on meta", "model is on cpu"],
    ),
    (
        "data: NaN into the diffusion chain",
        lambda p: chain64().model(with_nan(torch.rand(4, 64) * 2 - 1)),
        ValueError,
        ["x0", "finite", "nan"],
    ),
    (
        "data: 2-D points for an image chain",
        lambda p: chain64().model(torch.rand(4, 2)),
        ValueError,
        ["x0", "64", "(4, 2)"],
    ),
    (
        "data: values outside [-1, 1] for the discretised decoder",
        lambda p: chain64().model(torch.rand(4, 64) * 3),
        ValueError,
        ["x0", "[-1, 1]"],
    ),
    ("data: empty dataset loader", lambda p: data.make_loader(torch.rand(0, 64)), ValueError, ["empty", "0 rows"]),
    # models
    (
        "model: unknown prior",
        lambda p: tiny_config(p, prior="gauss").check(),
        ValueError,
        ["prior", "'gauss'", "normal"],
    ),
    ("model: unknown guide", lambda p: tiny_config(p, guide="mf").check(), ValueError, ["guide", "'mf'", "diag"]),
    (
        "model: unknown likelihood",
        lambda p: tiny_config(p, likelihood="poisson").check(),
        ValueError,
        ["likelihood", "'poisson'", "bernoulli"],
    ),
    ("model: unknown network", lambda p: tiny_config(p, net="resnet").check(), ValueError, ["net", "'resnet'", "mlp"]),
    (
        "model: unknown schedule",
        lambda p: tiny_config(p, model="diffusion", schedule="quad").check(),
        ValueError,
        ["schedule", "'quad'", "linear"],
    ),
    (
        "model: unknown dataset",
        lambda p: tiny_config(p, data="cifar").check(),
        ValueError,
        ["data", "'cifar'", "mnist5k"],
    ),
    (
        "model: unknown prior (Python API)",
        lambda p: build_vae(64, 2, prior="gauss"),
        ValueError,
        ["prior", "'gauss'", "normal"],
    ),
    ("model: z_dim < 1", lambda p: tiny_config(p, z_dim=0).check(), ValueError, ["z_dim", ">= 1", "0"]),
    ("model: z_dim < 1 (Python API)", lambda p: build_vae(64, 0), ValueError, ["z_dim", ">= 1", "0"]),
    ("model: T < 1", lambda p: tiny_config(p, model="diffusion", T=0).check(), ValueError, ["T", ">= 1", "0"]),
    (
        "model: betas outside (0, 1)",
        lambda p: NoiseSchedule(torch.tensor([0.1, 1.5])),
        ValueError,
        ["betas", "(0, 1)", "1.5"],
    ),
    (
        "model: betas not finite",
        lambda p: NoiseSchedule(torch.tensor([0.1, float("nan")])),
        ValueError,
        ["betas", "finite", "nan"],
    ),
    (
        "model: strided sampler, more steps than T",
        lambda p: NoiseSchedule.from_name("linear", 10).respace(11),
        ValueError,
        ["steps", "1..10", "11"],
    ),
    (
        "model: strided sampler, 0 steps",
        lambda p: NoiseSchedule.from_name("linear", 10).respace(0),
        ValueError,
        ["steps", "1..10", "0"],
    ),
    ("model: batch size < 1", lambda p: tiny_config(p, batch_size=0).check(), ValueError, ["batch_size", ">= 1", "0"]),
    ("model: negative learning rate", lambda p: tiny_config(p, lr=-0.1).check(), ValueError, ["lr", "> 0", "-0.1"]),
    (
        "model: unknown nan_policy",
        lambda p: tiny_config(p, nan_policy="ignore").check(),
        ValueError,
        ["nan_policy", "'ignore'", "stop, skip"],
    ),
    # files
    (
        "file: missing checkpoint",
        lambda p: load_checkpoint(str(p / "nope.pt")),
        FileNotFoundError,
        ["no checkpoint", "nope.pt"],
    ),
    (
        "file: corrupt checkpoint",
        lambda p: load_checkpoint(write(p / "c.pt", b"\x80\x02garbage")),
        ValueError,
        ["cannot read checkpoint", "c.pt"],
    ),
    (
        "file: a tensor file, not a checkpoint",
        lambda p: load_checkpoint(save(p / "t.pt", torch.zeros(2))),
        ValueError,
        ["not a pyrovae checkpoint", "Tensor"],
    ),
    (
        "file: checkpoint of another model",
        lambda p: checkpoint.load(other_model_checkpoint(p), model="diffusion"),
        ValueError,
        ["'vae' model", "model='diffusion'"],
    ),
    (
        "file: checkpoint of another config",
        lambda p: train(resume_changed(p)),
        ValueError,
        ["cannot resume", "z_dim: checkpoint 2, requested 3"],
    ),
    (
        "file: truncated IDX",
        lambda p: data.read_idx(write(p / "t-idx1-ubyte", idx_bytes(payload=b"\x00"))),
        ValueError,
        ["IDX data has 1 bytes", "need 4", "truncated"],
    ),
    (
        "file: IDX with a wrong magic number",
        lambda p: data.read_idx(write(p / "m-idx1-ubyte", idx_bytes(magic=b"PK\x03\x04"))),
        ValueError,
        ["not an IDX file", "magic", "504b0304"],
    ),
    (
        "file: output folder not writable",
        lambda p: train(unwritable_out(p)),
        ValueError,
        ["output folder", "not writable", "a-file"],
    ),
    (
        "file: --resume on a folder with no checkpoint",
        lambda p: train(tiny_config(p, resume=str(p))),
        FileNotFoundError,
        ["no checkpoint", "checkpoint.pt"],
    ),
    # issue 17: the cases a new user tried
    (
        "file: empty checkpoint",
        lambda p: load_checkpoint(write(p / "e.pt", b"")),
        ValueError,
        ["cannot read checkpoint", "e.pt", "empty (0 bytes)", "not a pyrovae checkpoint"],
    ),
    (
        "file: garbage checkpoint",
        lambda p: load_checkpoint(write(p / "g.pt", b"\x80\x02garbage")),
        ValueError,
        ["g.pt", "not a pyrovae checkpoint", "Unsupported operand"],
    ),
    (
        "file: a text file as checkpoint",
        lambda p: load_checkpoint(write(p / "t.pt", b"hello world, no pickle")),
        ValueError,
        ["t.pt", "not a pyrovae checkpoint"],
    ),
    (
        "file: gzip IDX that is not gzip",
        lambda p: data.read_idx(write(p / "x-idx1-ubyte.gz", idx_bytes())),
        ValueError,
        ["x-idx1-ubyte.gz", "not a readable gzip file", "BadGzipFile"],
    ),
    (
        "file: truncated gzip IDX",
        lambda p: data.read_idx(write(p / "y-idx1-ubyte.gz", gzip_bytes(idx_bytes())[:12])),
        ValueError,
        ["y-idx1-ubyte.gz", "not a readable gzip file", "EOFError"],
    ),
    (
        "model: encoder with the wrong event size",
        lambda p: elbo_loss(build_vae(64, 2, (8,), guide=WrongEventSize()), torch.rand(4, 64).round()),
        ValueError,
        ["encoder", "event shape (z_dim,) = (2,)", "(3,)"],
    ),
    (
        "model: prior with the wrong event size",
        lambda p: elbo_loss(build_vae(64, 2, (8,), prior=WrongEventSize()), torch.rand(4, 64).round()),
        ValueError,
        ["prior", "event shape (z_dim,) = (2,)", "(3,)"],
    ),
    ("model: z_dim = 2.5 (Python API)", lambda p: build_vae(64, 2.5), ValueError, ["z_dim", "integer >= 1", "2.5"]),
    (
        "model: z_dim = 2.5 (TrainConfig)",
        lambda p: train(tiny_config(p, z_dim=2.5)),
        ValueError,
        ["z_dim", "integer >= 1", "2.5"],
    ),
    (
        "model: DiffusionELBO(num_particles=0)",
        lambda p: DiffusionELBO(num_particles=0),
        ValueError,
        ["num_particles", "integer >= 1", "0"],
    ),
    (
        "data: moons for a Bernoulli VAE",
        lambda p: train(tiny_config(p, data="moons")),
        ValueError,
        ["'moons'", "bernoulli", "[0, 1]", "--likelihood gaussian"],
    ),
    (
        "data: moons for a continuous-Bernoulli VAE",
        lambda p: train(tiny_config(p, data="moons", likelihood="continuous-bernoulli")),
        ValueError,
        ["'moons'", "outside [0, 1]", "continuous-bernoulli", "--likelihood gaussian"],
    ),
    (
        "data: moons for a discretised VAE",
        lambda p: train(tiny_config(p, data="moons", likelihood="discretised-logistic")),
        ValueError,
        ["'moons'", "outside [0, 1]", "discretised-logistic"],
    ),
    (
        "data: grey levels, --binarize none, Bernoulli",
        lambda p: train(tiny_config(p, binarize="none")),
        ValueError,
        ["'digits'", "outside {0, 1}", "bernoulli", "--binarize dynamic"],
    ),
    (
        "run folder: holds a run",
        lambda p: train(tiny_config(finished_run(p))),
        runs.RunFolderError,
        ["already holds a run", "--resume", "--overwrite"],
    ),
    (
        "run folder: locked by a live process",
        lambda p: train(tiny_config(locked_by(p / "r", socket.gethostname(), os.getppid()))),
        runs.RunFolderError,
        ["in use by process", str(os.getppid()), runs.LOCK],
    ),
    (
        "run folder: locked on another host",
        lambda p: train(tiny_config(locked_by(p / "r", "elsewhere.example", 1))),
        runs.RunFolderError,
        ["host 'elsewhere.example'", "delete the lock file"],
    ),
    (
        "run folder: --resume into another run's folder",
        lambda p: train(tiny_config(finished_run(p, "b"), epochs=2, resume=str(finished_run(p, "a")))),
        runs.RunFolderError,
        ["already holds a run"],
    ),
    (
        "config: --tensorboard without the package",
        lambda p: train(tiny_config(p / "tb", tensorboard=True)),
        ValueError,
        ["tensorboard package"],
    ),
]


@pytest.mark.parametrize("case, call, error, words", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_error(case, call, error, words, tmp_path):
    with pytest.raises(error) as exc:
        call(tmp_path)
    for word in words:
        assert word in str(exc.value), f"{case}: {word!r} not in {exc.value}"


BAD_FLAGS = [
    ["train", "vae", "--z-dim", "0"],
    ["train", "vae", "--batch-size", "-4"],
    ["train", "vae", "--lr", "-1e-3"],
    ["train", "vae", "--prior", "gauss"],
    ["train", "vae", "--epochs", "ten"],
    ["train", "diffusion", "--T", "0"],
    ["train", "diffusion", "--schedule", "quad"],
    ["train", "vae", "--nan-policy", "ignore"],
    ["sample", "diffusion", "run", "--steps", "0"],
    # issue 17 and more: every bound in the configs is a usage error
    ["train", "vae", "--ema-decay", "1"],
    ["train", "diffusion", "--ema-decay", "1.5"],
    ["train", "vae", "--lr", "inf"],
    ["train", "vae", "--lr", "nan"],
    ["train", "vae", "--grad-clip", "0"],
    ["train", "vae", "--lr-gamma", "2"],
    ["train", "vae", "--warmup-steps", "-1"],
    ["train", "vae", "--z-dim", "2.5"],
    ["train", "vae", "--hidden", "8", "0"],
    ["train", "vae", "--train-size", "0"],
    ["train", "vae", "--kl-warmup", "-2"],
    ["train", "vae", "--iwae-k", "-1"],
    ["train", "vae", "--test-particles", "0"],
    ["train", "vae", "--eval-every", "0"],
    ["train", "vae", "--likelihood", "poisson"],
    ["train", "diffusion", "--T", "2.5"],
    ["train", "diffusion", "--channels", "0"],
    ["train", "diffusion", "--objective", "vlb"],
    ["train", "diffusion", "--variance", "fixed"],
    ["train", "diffusion", "--z-dim", "2"],
    ["sample", "vae", "run", "--n", "0"],
    ["sample", "vae", "run", "--chunk-size", "0"],
    ["evaluate", "diffusion", "run", "--n", "0"],
]


@pytest.mark.parametrize("argv", BAD_FLAGS, ids=[" ".join(a[1:]) for a in BAD_FLAGS])
def test_bad_flag_value_gives_usage_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    flag = [a for a in argv if a.startswith("--")][-1]
    assert exc.value.code == 2 and "usage:" in err and flag in err


CLI_ERRORS = [
    (["sample", "vae", "{tmp}/missing"], "no checkpoint"),
    (["evaluate", "vae", "{tmp}/missing"], "no checkpoint"),
    (["train", "vae", *TINY, "--epochs", "1", "--resume", "{tmp}"], "no checkpoint"),
    (["train", "vae", *TINY, "--epochs", "1", "--out", "{tmp}/a-file/run"], "not writable"),
    (["train", "vae", *TINY, "--epochs", "1", "--data", "fashion-mnist", "--data-dir", "{tmp}"], "not found"),
    (["sample", "vae", "{tmp}/a-file"], "not a pyrovae checkpoint"),
    (["train", "vae", *TINY, "--data", "moons", "--out", "{tmp}/m"], "--likelihood gaussian"),
    (["train", "vae", *TINY, "--tensorboard", "--out", "{tmp}/tb"], "tensorboard package"),
    (["train", "diffusion", "--resume", "{tmp}/vae-run"], "is a 'vae' run"),
    (["train", "vae", *TINY, "--out", "{tmp}/vae-run"], "already holds a run"),
    (["train", "vae", *TINY, "--resume", "{tmp}/vae-run"], "has finished its 1 epochs; give --epochs N with N > 1"),
    (["train", "vae", "--epochs", "1", "--resume", "{tmp}/vae-run"], "epochs must be > 1"),
]


@pytest.mark.parametrize("argv, words", CLI_ERRORS, ids=[" ".join(a[:2]) + " " + w for a, w in CLI_ERRORS])
def test_cli_runtime_error_is_one_line_and_exit_1(argv, words, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    if "{tmp}/vae-run" in argv:
        finished_run(tmp_path, "vae-run")
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("pyrovae: error:") and words in err and "Traceback" not in err
    assert err.count("\n") == 1, err


def test_cli_keeps_validation_on_unless_no_validate(tmp_path, capsys):
    assert main(["train", "vae", *TINY, "--epochs", "1", "--out", str(tmp_path / "on")]) == 0
    assert main(["train", "vae", *TINY, "--epochs", "1", "--no-validate", "--out", str(tmp_path / "off")]) == 0
    assert TrainConfig.from_dict(load_checkpoint(str(tmp_path / "on"))["config"]).validate is True
    assert TrainConfig.from_dict(load_checkpoint(str(tmp_path / "off"))["config"]).validate is False


def test_grey_data_for_a_bernoulli_run_names_the_binarize_flag(tmp_path, capsys):
    code = main(["train", "vae", *TINY, "--epochs", "1", "--binarize", "none", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "--binarize" in err


# ---- faults ----


def nan_on_step(monkeypatch, bad_steps, recipe=None):
    """Make the batches of the given (1-based, global) steps hold a NaN, as a
    corrupt example or an overflow would; validation is off so that the data
    check does not catch it first and the loss itself goes bad."""
    from pyrovae.recipes.vae import VAERecipe

    recipe = recipe or VAERecipe
    prepare = recipe.prepare_batch
    calls = {"n": 0}

    def poisoned(self, cfg, x):
        calls["n"] += 1
        x = prepare(self, cfg, x)
        return with_nan(x) if calls["n"] in bad_steps else x

    monkeypatch.setattr(recipe, "prepare_batch", poisoned)


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's own notice of the injected NaN
def test_nan_loss_stops_naming_step_and_term_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    nan_on_step(monkeypatch, {5})  # 3 steps per epoch: step 5 is in epoch 2
    code = main(["train", "vae", *TINY, "--epochs", "3", "--no-validate", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("pyrovae: error:")
    assert "step 5" in err and "epoch 2" in err and "'x'" in err and "checkpoint.pt (epoch 1)" in err
    ckpt = load_checkpoint(str(tmp_path))
    assert ckpt["epoch"] == 1 and ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    monkeypatch.undo()
    assert main(["train", "vae", *TINY, "--epochs", "2", "--resume", str(tmp_path)]) == 0
    assert load_checkpoint(str(tmp_path))["epoch"] == 2


def test_under_validation_a_nan_from_the_network_is_caught_as_a_nan_loss(tmp_path, monkeypatch):
    """With validation on, a NaN decoder output is torch's invalid-parameter
    ValueError inside the ELBO; the loop reports it as a non-finite step too."""
    from pyrovae.recipes.vae import VAERecipe

    build, calls = VAERecipe.build, {"n": 0}

    class NaNFromStep5(torch.nn.Module):
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, z):
            calls["n"] += 1
            out = self.decoder(z)
            return out * float("nan") if calls["n"] >= 5 else out

    def poisoned_build(self, cfg, ds):
        vae = build(self, cfg, ds)
        vae.decoder = NaNFromStep5(vae.decoder)
        return vae

    monkeypatch.setattr(VAERecipe, "build", poisoned_build)
    with pytest.raises(FloatingPointError) as exc:
        train(tiny_config(tmp_path, epochs=3, eval_every=10))
    message = str(exc.value)
    assert "step 5 (epoch 2)" in message and "Expected parameter logits" in message and "log p at 'x'" in message
    assert load_checkpoint(str(tmp_path))["epoch"] == 1


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's own notice of the injected NaN
def test_nan_policy_skip_skips_the_step_counts_it_and_keeps_weights_finite(tmp_path, monkeypatch):
    nan_on_step(monkeypatch, {2, 5})
    result = train(tiny_config(tmp_path, epochs=3, validate=False, nan_policy="skip"))
    assert [row["skipped_steps"] for row in result.metrics] == [1, 2, 2]
    assert [row["step"] for row in result.metrics] == [2, 4, 7]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # Pyro's own notice of the injected NaN
def test_nan_policy_is_the_shared_loop_s_so_diffusion_runs_skip_too(tmp_path, monkeypatch):
    from pyrovae.recipes.diffusion import DiffusionRecipe

    nan_on_step(monkeypatch, {3}, DiffusionRecipe)
    cfg = tiny_config(
        tmp_path,
        model="diffusion",
        data="moons",
        T=4,
        hidden=[8],
        epochs=2,
        eval_every=1,
        validate=False,
        nan_policy="skip",
        sample_steps=2,
    )
    result = train(cfg)
    assert [row["skipped_steps"] for row in result.metrics] == [1, 1]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def _train_forever(out: str) -> None:
    """The forked child: train with a checkpoint after every (tiny) epoch, so
    most of its time is spent inside saves."""
    # The parent's OpenMP pool does not survive fork (libgomp hangs in the
    # child's first parallel region); one thread keeps torch out of OpenMP.
    torch.set_num_threads(1)
    # tqdm's write lock holds a semaphore shared with the parent across fork: a SIGKILL that lands while this
    # child holds it would leave it taken, and the parent's next progress bar would wait for it for ever
    # (the suite hung so, once in a few runs). A lock of the child's own keeps the parent out of it.
    tqdm.set_lock(threading.RLock())  # the class pyrovae's bars use
    cfg = tiny_config(out, epochs=10**6, train_size=16, eval_every=10**6)
    if os.path.exists(os.path.join(out, checkpoint.CHECKPOINT)):
        cfg.resume = out
    train(cfg)


def test_sigkill_during_checkpoint_saves_never_corrupts_and_resume_continues(tmp_path):
    """Kill a training process ~10 times at random moments (most of them fall
    inside a save); each time the checkpoint loads, its epoch never goes back,
    and the next process resumes from it."""
    ctx = multiprocessing.get_context("fork")
    # One run here does the imports (scikit-learn, torch.optim's dynamo) once, not in every child.
    train(tiny_config(tmp_path / "warm-up", epochs=1, train_size=16))
    rng = random.Random(0)
    out, path, epochs = str(tmp_path / "run"), tmp_path / "run" / checkpoint.CHECKPOINT, []
    for _ in range(10):
        before = path.stat().st_mtime_ns if path.exists() else None
        child = ctx.Process(target=_train_forever, args=(out,))
        child.start()
        deadline = time.monotonic() + 30
        while (
            (not path.exists() or path.stat().st_mtime_ns == before)
            and time.monotonic() < deadline
            and child.is_alive()
        ):
            time.sleep(0.005)  # wait for this process's first save
        assert child.is_alive(), f"training child died with exit code {child.exitcode}"
        time.sleep(rng.uniform(0, 0.05))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        ckpt = load_checkpoint(out)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
        epochs.append(ckpt["epoch"])
    assert epochs == sorted(epochs) and epochs[-1] > epochs[0]
    # A kill inside a save leaves at most the one temporary file of that save; the next run removes it.
    assert len([f for f in os.listdir(out) if checkpoint.TMP_SUFFIX in f]) <= 1


def test_disk_full_during_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    assert main(["train", "vae", *TINY, "--epochs", "1", "--out", str(tmp_path)]) == 0
    good = (tmp_path / "checkpoint.pt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    code = main(["train", "vae", *TINY, "--epochs", "2", "--resume", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and "previous" in err and "checkpoint.pt" in err
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert not [f for f in os.listdir(tmp_path) if checkpoint.TMP_SUFFIX in f]


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_runs_code_under_plain_pickle_but_not_through_load_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "payload": RunsCode(marker)}, evil)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(str(evil))
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        checkpoint.load(str(evil))
    assert not marker.exists()
    # The file is a real exploit: plain unpickling runs the command.
    torch.load(evil, weights_only=False)
    assert marker.exists()


# ---- run folders (issue 17 items 1-3) ----


def folder_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if (folder / name).is_file()}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = multiprocessing.get_context("fork").Process(target=int)
    child.start()
    child.join()
    return child.pid


def test_a_run_folder_holding_a_run_is_refused_and_left_byte_for_byte(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "vae", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    before = folder_bytes(out)
    assert main(["train", "vae", *TINY, "--epochs", "1", "--seed", "5", "--out", str(out)]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert folder_bytes(out) == before and runs.LOCK not in os.listdir(out)


def test_overwrite_replaces_the_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "vae", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    assert main(["train", "vae", *TINY, "--epochs", "1", "--seed", "5", "--overwrite", "--out", str(out)]) == 0
    ckpt = load_checkpoint(str(out))
    assert (
        ckpt["epoch"] == 1
        and ckpt["config"]["seed"] == 5
        and json.loads((out / "config.json").read_text())["seed"] == 5
    )


def test_a_run_that_fails_its_checks_writes_nothing_and_removes_the_lock(tmp_path, capsys):
    """Even with --overwrite, the old run stays as it was until every check has passed."""
    out = tmp_path / "run"
    assert main(["train", "vae", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    before = folder_bytes(out)
    argv = [
        "train",
        "vae",
        *TINY,
        "--epochs",
        "1",
        "--z-dim",
        "7",
        "--overwrite",
        "--data",
        "fashion-mnist",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(out),
    ]
    assert main(argv) == 1 and "not found" in capsys.readouterr().err
    assert folder_bytes(out) == before and runs.LOCK not in os.listdir(out)
    # A folder the failed run created itself is removed again.
    assert main(["train", "vae", *TINY, "--data", "moons", "--out", str(tmp_path / "new")]) == 1
    assert not (tmp_path / "new").exists()


def test_only_our_own_temporaries_are_removed(tmp_path):
    out = tmp_path / "mine"
    train(tiny_config(out, epochs=1))  # a run folder: a folder of other files alone is refused (issue 24)
    users = [".tmp-notes.txt", ".tmp-", "draft.pyrovae-tmp", ".x.pyrovae-tmp-12ab"]
    for name in users:
        (out / name).write_text("the user's")
    ours = f".checkpoint.pt.k3j2{checkpoint.TMP_SUFFIX}{dead_pid()}"
    (out / ours).write_bytes(b"half a checkpoint")
    train(tiny_config(out, epochs=1, overwrite=True))
    left = set(os.listdir(out))
    assert set(users) <= left and ours not in left


def test_a_stale_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    out = locked_by(tmp_path / "run", socket.gethostname(), dead_pid())
    train(tiny_config(out, epochs=1))
    assert load_checkpoint(str(out))["epoch"] == 1 and runs.LOCK not in os.listdir(out)


def test_a_second_run_on_a_folder_in_use_is_refused(tmp_path):
    """Two runs on one --out: the second is refused while the first trains,
    and the first keeps the folder."""
    out = tmp_path / "run"
    child = multiprocessing.get_context("fork").Process(target=_train_forever, args=(str(out),))
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not (out / checkpoint.CHECKPOINT).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(runs.RunFolderError, match=f"in use by process {child.pid}"):
            train(tiny_config(out, epochs=1, overwrite=True))
        assert child.is_alive()
        assert json.loads((out / runs.LOCK).read_text())["pid"] == child.pid
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join()


def test_under_torchrun_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    with runs.open_run(str(tmp_path / "r0")):
        assert (tmp_path / "r0" / runs.LOCK).exists()
    monkeypatch.setattr(runs.distributed, "rank", lambda: 1)
    with runs.open_run(str(tmp_path / "r1")):
        assert not (tmp_path / "r1").exists()


# ---- Ctrl-C (issue 17 item 12) ----


def ctrl_c_on_step(monkeypatch, step, recipe=None, signum=signal.SIGINT):
    """Press Ctrl-C (a real SIGINT to this process; or send ``signum``) while
    the given 1-based step's batch is prepared."""
    from pyrovae.recipes.vae import VAERecipe

    recipe = recipe or VAERecipe
    prepare, calls = recipe.prepare_batch, {"n": 0}

    def pressed(self, cfg, x):
        calls["n"] += 1
        if calls["n"] == step:
            signal.raise_signal(signum)
        return prepare(self, cfg, x)

    monkeypatch.setattr(recipe, "prepare_batch", pressed)
    return calls


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_after_the_step_keeps_the_checkpoint_and_says_how_to_resume(signum, tmp_path, monkeypatch, capsys):
    """SIGTERM is what torchrun sends its workers on Ctrl-C: the same clean stop."""
    calls = ctrl_c_on_step(monkeypatch, 5, signum=signum)  # 3 steps per epoch: step 5 is in epoch 2
    out = str(tmp_path / "run")
    # what the handlers were (a background job's shell leaves SIGINT ignored, not the default)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(["train", "vae", *TINY, "--epochs", "3", "--out", out]) == 130
    err = capsys.readouterr().err
    assert calls["n"] == 5 and "Traceback" not in err and err.count("\n") == 1
    assert "interrupted after step 5 (epoch 2)" in err and f"pyrovae train vae --resume {out}" in err
    assert load_checkpoint(out)["epoch"] == 1 and runs.LOCK not in os.listdir(out)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # the handlers are put back
    monkeypatch.undo()
    # Without --epochs the resumed run continues to its own epoch count.
    assert main(["train", "vae", "--quiet", "--resume", out]) == 0
    assert load_checkpoint(out)["epoch"] == 3


# ---- data of another floating dtype (issue 17 item 16) ----


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "make, data",
    [(vae64, lambda: torch.rand(4, 64).round()), (chain64, lambda: torch.rand(4, 64) * 2 - 1)],
    ids=["vae", "chain"],
)
def test_floating_data_of_any_dtype_is_cast_to_the_model_s(make, data, dtype):
    """NumPy's default float64 (and half precision) gave 'mat1 and mat2 must
    have the same dtype': the model casts at its entry, so the ELBO is the
    float32 data's (up to the dtype's rounding of the values)."""
    model, x = make(), data()
    x_cast = x.to(dtype)
    guide = getattr(model, "guide_posterior", model.guide)
    pyro.set_rng_seed(0)
    loss = pyro.infer.Trace_ELBO().loss(model.model, guide, x_cast)
    pyro.set_rng_seed(0)
    assert loss == pytest.approx(pyro.infer.Trace_ELBO().loss(model.model, guide, x_cast.to(torch.float32)), rel=1e-6)
