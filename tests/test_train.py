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
from pyrovae.optim import make_optimizer, make_scheduler
from pyrovae.train import LossModule, TrainConfig, make_averaged_model, train_step
from pyrovae.vae import build_vae

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


def tiny_config(tmp_path, **changes) -> TrainConfig:
    cfg = TrainConfig(
        data="digits",
        train_size=48,
        test_size=32,
        batch_size=16,
        z_dim=3,
        hidden=[8],
        epochs=1,
        quiet=True,
        out=str(tmp_path),
    )
    return dataclasses.replace(cfg, **changes)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_train_writes_config_checkpoint_and_metrics_with_lr_and_seconds(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "vae", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    for name in (
        "config.json",
        "metrics.csv",
        "model.pt",
        "checkpoint.pt",
        "loss.png",
        "samples.png",
        "reconstructions.png",
    ):
        assert (out / name).is_file(), name
    rows = read_rows(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert [int(r["step"]) for r in rows] == [3, 6]  # 48 examples / 16 per batch
    assert float(rows[-1]["lr"]) == pytest.approx(1e-3)
    assert all(0 < float(r["grad_norm"]) < math.inf for r in rows)
    assert 0 < float(rows[0]["seconds"]) <= float(rows[1]["seconds"])
    saved = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert (saved.epochs, saved.z_dim, saved.data) == (2, 3, "digits")


def test_eval_every_evaluates_on_its_epochs_and_after_the_last(tmp_path):
    result = training.train(tiny_config(tmp_path, epochs=5, eval_every=2))
    assert [m["epoch"] for m in result.metrics] == [2, 4, 5]


def test_train_step_takes_the_step_pyro_svi_takes():
    """The torch loop (differentiable_loss, one torch Adam over the model's
    parameters) is SVI.step with pyro.optim.Adam (one Adam per tensor), up to
    the rounding of the multi-tensor kernels."""
    x = torch.bernoulli(torch.rand(8, 6, generator=torch.Generator().manual_seed(0)))
    params = []
    for step in ("pyro", "ours"):
        pyro.set_rng_seed(1)
        vae = build_vae(6, 2, (5,))
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 0.01}), make_elbo("trace"))
        loss_fn = LossModule(vae, make_elbo("trace"))
        optimizer = make_optimizer("adam", vae.parameters(), 0.01)
        for _ in range(3):
            if step == "pyro":
                svi.step(x)
            else:
                train_step(loss_fn, list(vae.parameters()), optimizer, x)
        params.append(dict(vae.state_dict()))
    for k in params[0]:
        torch.testing.assert_close(params[0][k], params[1][k], rtol=1e-5, atol=1e-7)


class Recorder(torch.optim.SGD):
    """An optimiser that records the global gradient norm it is stepped with."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.norms = []

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())


def test_grad_clip_bounds_the_global_gradient_norm_and_the_step_returns_it_unclipped():
    x = torch.bernoulli(torch.rand(32, 6, generator=torch.Generator().manual_seed(0)))
    seen, returned = {}, {}
    for clip in (None, 0.5):
        pyro.set_rng_seed(0)
        vae = build_vae(6, 2, (5,))
        optimizer = Recorder(vae.parameters())
        returned[clip] = train_step(
            LossModule(vae, make_elbo("trace")), list(vae.parameters()), optimizer, x, grad_clip=clip
        )[1]
        seen[clip] = optimizer.norms[0]
    assert seen[None] > 0.5  # so that clipping had something to do
    assert seen[0.5] == pytest.approx(0.5, rel=1e-5)
    assert returned[0.5] == pytest.approx(seen[None], rel=1e-6) == returned[None]


def test_a_nonfinite_loss_raises_before_the_step_and_leaves_no_gradients():
    vae = build_vae(6, 2, (5,))
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    optimizer = make_optimizer("adam", vae.parameters(), 0.1)
    x = torch.full((4, 6), float("nan"))
    with pytest.raises(training.NonFiniteLossError), pyro.validation_enabled(False):
        train_step(LossModule(vae, make_elbo("trace")), list(vae.parameters()), optimizer, x)
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())
    assert all(p.grad is None for p in vae.parameters())


def test_loss_module_holds_the_model_parameters():
    """Pyro's ELBOModule(vae.model, vae.guide) has none: bound methods are not submodules."""
    vae = build_vae(6, 2, (5,))
    assert len(list(make_elbo("trace")(vae.model, vae.guide).parameters())) == 0
    assert list(LossModule(vae, make_elbo("trace")).parameters()) == list(vae.parameters())


def test_readme_svi_loop_trains_two_models_in_one_session_without_clearing_the_store():
    """Each model registers under a name of its own in Pyro's param store."""
    g = torch.Generator().manual_seed(5)
    prototypes = (torch.rand(2, 20, generator=g) < 0.5).float()
    x = prototypes[torch.randint(2, (64,), generator=g)]  # two patterns: learnable, ~14 -> ~1 nats
    falls = []
    for _ in range(2):
        vae = build_vae(20, 2, (16,))
        svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), loss=pyro.infer.Trace_ELBO())
        before = {k: v.clone() for k, v in vae.named_parameters()}
        losses = [svi.step(x) for _ in range(100)]
        assert [k for k, v in vae.named_parameters() if torch.equal(before[k], v)] == []  # its own tensors trained
        falls.append(sum(losses[:10]) / sum(losses[-10:]))
    # a model stepping another model's tensors stays at its initial loss (ratio ~1)
    assert falls[0] > 2 and falls[1] > 2


def test_param_store_names_are_per_instance_and_never_shared_by_a_copy():
    import copy

    from pyrovae.params import pyro_name

    a, b = build_vae(6, 2, (5,)), build_vae(6, 2, (5,))
    names = {pyro_name(a, "vae"), pyro_name(b, "vae"), pyro_name(copy.deepcopy(a), "vae")}
    assert len(names) == 3 and pyro_name(a, "vae") == pyro_name(a, "vae")


def scheduled_lrs(cfg: TrainConfig, steps_per_epoch: int, n: int) -> list:
    """The learning rate of each of the first n steps."""
    p = torch.nn.Parameter(torch.zeros(1))
    optimizer = make_optimizer("adam", [p], cfg.lr)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    lrs = []
    for _ in range(n):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_schedule_with_warmup_follows_its_formula():
    cfg = TrainConfig(lr=0.1, epochs=2, lr_schedule="cosine", warmup_steps=3)
    total = 2 * 5
    expected = [0.1 * min(1, (k + 1) / 3) * 0.5 * (1 + math.cos(math.pi * k / total)) for k in range(total)]
    assert scheduled_lrs(cfg, 5, total) == pytest.approx(expected, rel=1e-12)


def test_exponential_schedule_multiplies_lr_by_gamma_each_epoch():
    lrs = scheduled_lrs(TrainConfig(lr=0.1, lr_schedule="exponential", lr_gamma=0.5), 4, 9)
    assert lrs[0] == pytest.approx(0.1) and lrs[4] == pytest.approx(0.05) and lrs[8] == pytest.approx(0.025)


def test_averaged_model_follows_the_ema_recursion_and_leaves_the_model_alone():
    module = torch.nn.Linear(1, 1, bias=False)
    averaged = make_averaged_model(module, decay=0.9)
    expected = None
    for k, w in enumerate([1.0, 2.0, 4.0, 8.0, 16.0], start=1):
        with torch.no_grad():
            module.weight.fill_(w)
        averaged.update_parameters(module)
        d = min(0.9, (1 + k) / (10 + k))
        expected = w if k == 1 else d * expected + (1 - d) * w  # the first update copies
    assert averaged.module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert module.weight.item() == 16.0 and averaged.module is not module


def test_evaluation_uses_the_ema_weights(tmp_path, monkeypatch):
    seen = []
    # Patch the class: undoing a patch of the instance would leave the old bound
    # method in its __dict__, hiding later patches of the class (test_reliability's).
    recipe = type(training.RECIPES["vae"])
    evaluate = recipe.evaluate

    def spy(self, cfg, model, x_test):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return evaluate(self, cfg, model, x_test)

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
    monkeypatch.setattr(
        recipe,
        "on_epoch_start",
        lambda self, cfg, epoch, objective: calls.append((cfg.epochs, epoch, type(objective).__name__)),
    )
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
    from pyrovae.config import _LEGACY_FIELDS, DiffusionConfig, VAEConfig

    old = {name: getattr(TrainConfig(), name, None) for name in _LEGACY_FIELDS}
    old.update(
        T=1000,
        schedule="linear",
        net="auto",
        channels=16,
        objective="elbo",
        parameterization="eps",
        variance="beta_tilde",
        time_sampler="uniform",
        sample_steps=50,
    )
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


def test_multi_tensor_optim_in_svi_takes_pyro_adams_steps_and_leaves_no_gradients():
    from pyrovae.optim import Adam as OneAdam

    x = (torch.rand(8, 6, generator=torch.Generator().manual_seed(2)) < 0.5).float()
    params = []
    for optim in (pyro.optim.Adam({"lr": 0.01}), OneAdam({"lr": 0.01})):
        pyro.set_rng_seed(1)
        vae = build_vae(6, 2, (5,))
        svi = SVI(vae.model, vae.guide, optim, make_elbo("trace"))
        for _ in range(3):
            svi.step(x)
        params.append(dict(vae.named_parameters()))
    for k in params[0]:
        torch.testing.assert_close(params[0][k], params[1][k], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in params[1].values())  # SVI's zero_grads allocates nothing
    assert len(optim.optimizer.param_groups) == 1 and len(optim.optimizer.param_groups[0]["params"]) == len(params[1])


def test_multi_tensor_optim_adds_a_second_model_as_a_param_group_and_restores_its_state():
    from pyrovae.optim import Adam as OneAdam

    x = (torch.rand(8, 6, generator=torch.Generator().manual_seed(2)) < 0.5).float()
    optim = OneAdam({"lr": 0.01})
    a, b = build_vae(6, 2, (5,)), build_vae(6, 2, (5,))
    for vae in (a, b):
        SVI(vae.model, vae.guide, optim, make_elbo("analytic")).step(x)
    assert len(optim.optimizer.param_groups) == 2
    state = optim.get_state()
    snapshot = {k: v.clone() for k, v in b.named_parameters()}

    def continue_b(optimizer):
        with torch.no_grad():
            for k, v in b.named_parameters():
                v.copy_(snapshot[k])
        pyro.set_rng_seed(7)
        SVI(b.model, b.guide, optimizer, make_elbo("analytic")).step(x)
        return {k: v.clone() for k, v in b.named_parameters()}

    fresh = OneAdam({"lr": 0.01})
    fresh.set_state(state)  # both models' parameters are in the param store: applied now
    assert fresh.optimizer is not None
    expected, got = continue_b(optim), continue_b(fresh)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
