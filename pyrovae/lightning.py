"""Train any pyrovae model with PyTorch Lightning (optional: ``pip install 'pyrovae[lightning]'``).

:class:`PyroLightningModule` wraps a model/guide pair and its objective as
Pyro's ``examples/svi_lightning.py`` does: the objective's
``differentiable_loss`` is the training step's loss, and a torch optimiser
steps the model's parameters, so that ``lightning.Trainer`` brings its
strategies (``strategy="ddp"``, ``devices=..., num_nodes=...``), checkpoints,
loggers and precision::

    import lightning
    from pyrovae import data
    from pyrovae.lightning import PyroLightningModule
    from pyrovae.config import TrainConfig

    ds = data.load_dataset("mnist5k")
    module = PyroLightningModule.from_config(TrainConfig(model="vae"), ds)
    loader = data.make_loader(ds.x_train, ds.y_train, batch_size=128)
    lightning.Trainer(max_epochs=10, strategy="ddp", devices=2).fit(module, loader)

The loss of a step is -ELBO summed over the process's examples, as in
:func:`pyrovae.train.train_step`, where the gradient over processes is that
of -ELBO of the global batch. DDP *averages* gradients over
its W processes, so each process's loss is multiplied by W; one SGD step
then moves the weights exactly as the project's own loop does on the same
global batch (tests/test_lightning.py checks this over gloo).

This module is the only one that imports Lightning; ``import pyrovae`` never does.
"""

from __future__ import annotations

import functools

import lightning
import torch

__all__ = ["PyroLightningModule"]


class PyroLightningModule(lightning.LightningModule):
    """A pyrovae model and its objective as a ``LightningModule``.

    :param model: an ``nn.Module`` with ``model(x)`` and ``guide(x)`` methods
        (any pyrovae model: VAE, hierarchical VAE, diffusion chain).
    :param objective: a Pyro ``ELBO`` with ``differentiable_loss(model, guide, x)``
        (``Trace_ELBO``, ``TraceAnalyticKL_ELBO``, ``DiffusionELBO``, ...).
    :param lr: the learning rate.
    :param optimizer: a ``torch.optim.Optimizer`` class (default Adam).
    :param prepare_batch: maps a loader's ``x`` to the model's input (e.g.
        binarisation, or a diffusion chain's [-1, 1] scaling); default identity.
    """

    def __init__(
        self, model: torch.nn.Module, objective, lr: float = 1e-3, optimizer=torch.optim.Adam, prepare_batch=None
    ):
        super().__init__()
        if not (callable(getattr(model, "model", None)) and callable(getattr(model, "guide", None))):
            raise TypeError(f"model must have model(x) and guide(x) methods, got {type(model).__name__}")
        if not hasattr(objective, "differentiable_loss"):
            raise TypeError(f"objective must be a Pyro ELBO with differentiable_loss, got {type(objective).__name__}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.model, self.objective, self.lr, self.optimizer_class = model, objective, lr, optimizer
        self.prepare_batch = prepare_batch

    @classmethod
    def from_config(cls, cfg, data) -> PyroLightningModule:
        """The model, objective, batch preparation and learning rate that
        ``pyrovae train`` would use for ``cfg`` on ``data`` (a Dataset or DataSpec)."""
        from pyrovae.config import resolve
        from pyrovae.optim import OPTIMIZERS
        from pyrovae.recipes import MODELS

        cfg = resolve(cfg.check())
        recipe = MODELS[cfg.model].recipe
        # A partial, not a lambda: ddp_spawn pickles the module.
        return cls(
            recipe.build(cfg, data),
            recipe.objective(cfg),
            cfg.lr,
            OPTIMIZERS[cfg.optimizer],
            functools.partial(recipe.prepare_batch, cfg),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-ELBO of ``x`` summed over its examples (differentiable)."""
        return self.objective.differentiable_loss(self.model.model, self.model.guide, x)

    def training_step(self, batch, batch_idx):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        x = self.prepare_batch(x) if self.prepare_batch is not None else x
        loss = self(x)
        self.log("train_loss", loss.detach() / len(x), prog_bar=True, batch_size=len(x))  # -ELBO per example
        # DDP averages the W processes' gradients; the -ELBO of the global batch is their sum.
        return loss * self.trainer.world_size

    def configure_optimizers(self):
        return self.optimizer_class(self.model.parameters(), lr=self.lr)
