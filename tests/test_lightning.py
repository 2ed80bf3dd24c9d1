"""pyrovae.lightning: a pyrovae model under lightning.Trainer, two gloo processes."""

import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lightning")

from test_distributed import fixed_noise_vae, global_batch, one_step  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning")
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, os.path.join(HERE, "lightning_ddp_script.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_process_lightning_sgd_step_equals_one_process_step_on_the_global_batch(ddp_run):
    _, params = one_step(fixed_noise_vae(), global_batch())
    lightning_params = torch.load(ddp_run / "step.pt", weights_only=True)
    before = fixed_noise_vae().state_dict()
    for k, v in params.items():
        torch.testing.assert_close(lightning_params[k], v, rtol=1e-5, atol=1e-6)
    # the step moved the weights (a scale factor lost would not be hidden by a zero step)
    assert any(not torch.allclose(before[k], v) for k, v in params.items())


def test_default_vae_trains_a_few_steps_with_equal_weights_on_both_ranks(ddp_run):
    r0, r1 = (torch.load(ddp_run / f"vae{r}.pt", weights_only=True) for r in range(2))
    assert r0["steps"] == 3 and torch.isfinite(torch.tensor(r0["loss"]))
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k


def test_core_package_does_not_import_lightning():
    code = "import sys, pyrovae, pyrovae.train, pyrovae.cli, pyrovae.data; sys.exit('lightning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(HERE)).returncode == 0


def test_module_rejects_what_is_not_a_model_or_an_objective():
    from pyrovae.infer import make_elbo
    from pyrovae.lightning import PyroLightningModule

    with pytest.raises(TypeError, match="model.*guide"):
        PyroLightningModule(torch.nn.Linear(2, 2), make_elbo("trace"))
    with pytest.raises(TypeError, match="differentiable_loss"):
        PyroLightningModule(fixed_noise_vae(), object())


def test_from_config_trains_a_colour_diffusion_chain_in_one_process():
    import lightning

    from pyrovae import data
    from pyrovae.config import TrainConfig
    from pyrovae.lightning import PyroLightningModule

    ds = data.load_dataset("photo-patches").subset(32, 8)
    module = PyroLightningModule.from_config(TrainConfig(model="diffusion", data="photo-patches", T=10, channels=4), ds)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data.make_loader(ds.x_train, ds.y_train, batch_size=16))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train_loss"])
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items())
