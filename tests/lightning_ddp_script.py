"""Run by tests/test_lightning.py as ``python lightning_ddp_script.py OUT``:
Lightning's ``strategy="ddp"`` relaunches this command for rank 1, so it must
be a script, not a test in the pytest process. Two gloo processes on CPU:

1. one SGD step of the fixed-noise VAE of tests/test_distributed.py on its
   global batch of 8 (4 per rank); rank 0 saves the weights;
2. a few steps of the default VAE from its config on digits (it runs, the
   loss is finite, both ranks end with equal weights).
"""

import os
import sys

import lightning
import pyro
import torch
from test_distributed import fixed_noise_vae, global_batch

from pyrovae import data
from pyrovae.config import TrainConfig
from pyrovae.infer import make_elbo
from pyrovae.lightning import PyroLightningModule


def trainer(steps):
    return lightning.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    pyro.clear_param_store()
    module = PyroLightningModule(fixed_noise_vae(), make_elbo("trace"), lr=0.05, optimizer=torch.optim.SGD)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(global_batch()), batch_size=4, shuffle=False)
    t = trainer(1)
    t.fit(module, loader)
    if t.global_rank == 0:
        torch.save(module.model.state_dict(), os.path.join(out, "step.pt"))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    ds = data.load_dataset("digits").subset(64, 16)
    module = PyroLightningModule.from_config(TrainConfig(model="vae", data="digits"), ds)
    t = trainer(3)
    t.fit(module, data.make_loader(ds.x_train, ds.y_train, batch_size=16, shuffle=False))
    torch.save(
        {"state": module.model.state_dict(), "loss": float(t.callback_metrics["train_loss"]), "steps": t.global_step},
        os.path.join(out, f"vae{t.global_rank}.pt"),
    )
