"""The shared SVI loop: its step, schedule, clipping, EMA, evaluation cadence and files."""

import csv
import dataclasses
import json
import math
import os

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI

from pyrovae import train as training
from pyrovae.cli import main
from pyrovae.infer import make_elbo
from pyrovae.train import EMA, TrainConfig, current_lr, make_optim, svi_step
from pyrovae.vae import build_vae

TINY = ["--data", "digits", "--train-size", "48", "--test-size", "32", "--batch-size", "16", "--z-dim", "3", "--hidden", "8", "--quiet"]


def tiny_config(tmp_path, **changes) -> TrainConfig:
    cfg = TrainConfig(data="digits", train_size=48, test_size=32, batch_size=16, z_dim=3, hidden=[8], epochs=1, quiet=True, out=str(tmp_path))
    return dataclasses.replace(cfg, **changes)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_train_writes_config_checkpoint_and_metrics_with_lr_and_seconds(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "vae", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    for name in ("config.json", "metrics.csv", "model.pt", "checkpoint.pt", "loss.png", "samples.png", "reconstructions.png"):
        assert (out / name).is_file(), name
    rows = read_rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [int(r["step"]) for r in rows] == [3, 6]  # 48 examples / 16 per batch
    assert float(rows[-1]["lr"]) == pytest.approx(1e-3)
    assert 0 < float(rows[0]["seconds"]) <= float(rows[1]["seconds"])
    saved = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert (saved.epochs, saved.z_dim, saved.data) == (2, 3, "digits")


def test_eval_every_evaluates_on_its_epochs_and_after_the_last(tmp_path):
    result = training.train(tiny_config(tmp_path, epochs=5, eval_every=2))
    assert [m["epoch"] for m in result.metrics] == [2, 4, 5]


def test_svi_step_equals_pyro_svi_step():
    """The written-out step is SVI.step when there is one process and no clipping."""
    x = torch.bernoulli(torch.rand(8, 6, generator=torch.Generator().manual_seed(0)))
    params = []
    for step in ("pyro", "ours"):
        pyro.clear_param_store()
        pyro.set_rng_seed(1)
        vae = build_vae(6, 2, (5,))
        optim = pyro.optim.Adam({"lr": 0.01})
        for _ in range(3):
            if step == "pyro":
                SVI(vae.model, vae.guide, optim, make_elbo("trace")).step(x)
            else:
                svi_step(make_elbo("trace"), vae, optim, x)
        params.append(dict(vae.state_dict()))
    for k in params[0]:
        assert torch.equal(params[0][k], params[1][k]), k


def test_grad_clip_bounds_the_global_gradient_norm():
    x = torch.bernoulli(torch.rand(32, 6, generator=torch.Generator().manual_seed(0)))
    norms = {}

    def record(params):  # stands in for the pyro.optim step, sees the clipped gradients
        norms[clip] = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()

    for clip in (None, 0.5):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        vae = build_vae(6, 2, (5,))
        svi_step(make_elbo("trace"), vae, record, x, grad_clip=clip)
    assert norms[None] > 0.5  # so that clipping had something to do
    assert norms[0.5] == pytest.approx(0.5, rel=1e-5)


def scheduled_lrs(cfg: TrainConfig, steps_per_epoch: int, n: int) -> list:
    """The learning rate of each of the first n steps."""
    pyro.clear_param_store()
    p = pyro.param("w", torch.zeros(1))
    optim = make_optim(cfg, steps_per_epoch)
    lrs = []
    for _ in range(n):
        p.grad = torch.zeros_like(p)
        optim([p.unconstrained()])
        lrs.append(current_lr(optim))
        optim.step()
    return lrs


def test_cosine_schedule_with_warmup_follows_its_formula():
    cfg = TrainConfig(lr=0.1, epochs=2, lr_schedule="cosine", warmup_steps=3)
    total = 2 * 5
    expected = [0.1 * min(1, (k + 1) / 3) * 0.5 * (1 + math.cos(math.pi * k / total)) for k in range(total)]
    assert scheduled_lrs(cfg, 5, total) == pytest.approx(expected, rel=1e-12)


def test_exponential_schedule_multiplies_lr_by_gamma_each_epoch():
    lrs = scheduled_lrs(TrainConfig(lr=0.1, lr_schedule="exponential", lr_gamma=0.5), 4, 9)
    assert lrs[0] == pytest.approx(0.1) and lrs[4] == pytest.approx(0.05) and lrs[8] == pytest.approx(0.025)


def test_ema_follows_its_recursion_and_applied_restores_the_weights():
    module = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(0.0)
    ema = EMA(module, decay=0.9)
    expected = 0.0
    for k, w in enumerate([1.0, 2.0, 4.0, 8.0, 16.0], start=1):
        with torch.no_grad():
            module.weight.fill_(w)
        ema.update(module, k)
        d = min(0.9, (1 + k) / (10 + k))
        expected = d * expected + (1 - d) * w
    assert ema.shadow["weight"].item() == pytest.approx(expected, rel=1e-6)
    with ema.applied(module):
        assert module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert module.weight.item() == 16.0


def test_evaluation_uses_the_ema_weights(tmp_path, monkeypatch):
    seen = []
    recipe = training.RECIPES["vae"]
    evaluate = recipe.evaluate

    def spy(cfg, model, x_test):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return evaluate(cfg, model, x_test)

    monkeypatch.setattr(recipe, "evaluate", spy)
    result = training.train(tiny_config(tmp_path, ema_decay=0.5))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    for k, v in seen[0].items():
        assert torch.equal(v, ckpt["ema"][k]), k
    assert any(not torch.equal(ckpt["ema"][k], v) for k, v in result.model.state_dict().items())


def test_loop_calls_on_epoch_start_with_config_epoch_and_objective(tmp_path, monkeypatch):
    calls = []
    # Patch the class: undoing a patch of the instance would leave the old bound
    # method in its __dict__, hiding later patches of the class (test_analytic_elbo's).
    recipe = type(training.RECIPES["vae"])
    monkeypatch.setattr(recipe, "on_epoch_start", lambda self, cfg, epoch, objective: calls.append((cfg.epochs, epoch, type(objective).__name__)))
    training.train(tiny_config(tmp_path, epochs=2, elbo="trace"))
    assert calls == [(2, 1, "Trace_ELBO"), (2, 2, "Trace_ELBO")]


def test_bf16_autocast_trains_with_finite_elbo(tmp_path):
    result = training.train(tiny_config(tmp_path, precision="bf16", optimizer="clippedadam"))
    assert math.isfinite(result.metrics[0]["train_elbo"]) and math.isfinite(result.metrics[0]["test_elbo"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"optimizer": "sgd"}, "optimizer"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"eval_every": 0}, "eval_every"),
        ({"precision": "fp16"}, "precision"),
    ],
)
def test_bad_settings_name_the_field(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **change).check()


def test_tensorboard_logs_event_files_when_installed(tmp_path):
    pytest.importorskip("torch.utils.tensorboard", reason="tensorboard is not installed (optional)")
    training.train(tiny_config(tmp_path, tensorboard=True))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


def test_tensorboard_requested_but_not_installed_names_the_package(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="pip install tensorboard"):
        training.train(tiny_config(tmp_path, tensorboard=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_run_keeps_model_and_checkpoint_consistent(tmp_path):
    result = training.train(tiny_config(tmp_path, device="cuda", precision="bf16"))
    assert all(p.is_cuda for p in result.model.parameters())
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["rng"][0]["cuda"]


def test_cuda_requested_without_gpu_is_an_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["train", "vae", *TINY, "--device", "cuda", "--out", str(tmp_path)]) == 1


@pytest.mark.parametrize("model", sorted(training.MODELS))
def test_python_and_cli_build_the_same_default_config_for_every_model(model):
    from pyrovae.cli import build_parser, config_from_args
    from pyrovae.config import MODELS

    from_cli = config_from_args(build_parser().parse_args(["train", model]))
    assert from_cli == TrainConfig(model=model) == MODELS[model].config()
    assert type(from_cli) is MODELS[model].config


def test_data_dependent_defaults_are_resolved_by_the_data_kind_and_explicit_values_kept():
    from pyrovae.config import DiffusionConfig, resolve

    image = resolve(DiffusionConfig(data="digits"))
    points = resolve(DiffusionConfig(data="moons"))
    assert (image.objective, image.variance, image.net) == ("hybrid", "learned", "unet")
    assert (points.objective, points.variance, points.net) == ("elbo", "beta_tilde", "mlp")
    assert resolve(DiffusionConfig(data="digits", objective="elbo", variance="beta")).objective == "elbo"
    assert resolve(TrainConfig()) == TrainConfig()  # the VAE has nothing data-dependent


def test_an_old_flat_config_converts_on_read():
    """pyrovae 0.1 saved one config with both models' fields."""
    from pyrovae.config import DiffusionConfig, VAEConfig, _LEGACY_FIELDS

    old = {name: getattr(TrainConfig(), name, None) for name in _LEGACY_FIELDS}
    old.update(T=1000, schedule="linear", net="auto", channels=16, objective="elbo", parameterization="eps", variance="beta_tilde", time_sampler="uniform", sample_steps=50)
    vae = TrainConfig.from_dict({**old, "model": "vae", "z_dim": 7})
    assert type(vae) is VAEConfig and vae.z_dim == 7 and vae.net == "mlp" and not hasattr(vae, "T")
    old_diffusion = {**old, "model": "diffusion", "T": 10, "hidden": [32], "z_dim": 50}
    chain = TrainConfig.from_dict(old_diffusion)
    assert type(chain) is DiffusionConfig and (chain.T, chain.hidden) == (10, [32]) and not hasattr(chain, "z_dim")
    with pytest.raises(ValueError, match="unknown config fields"):
        TrainConfig.from_dict({"model": "vae", "not_a_field": 1})


@pytest.mark.parametrize(
    "model, change, message",
    [
        ("vae", {"lr": math.inf}, "lr must be < inf"),
        ("vae", {"hidden": [8, 0]}, "hidden must be >= 1"),
        ("diffusion", {"T": 0}, "T must be >= 1"),
        ("diffusion", {"objective": "best"}, "unknown objective 'best'"),
        ("vae", {"ema_decay": None, "z_dim": None}, "z_dim must not be None"),
    ],
)
def test_field_metadata_checks_name_the_field(model, change, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(model=model, **change).check()
