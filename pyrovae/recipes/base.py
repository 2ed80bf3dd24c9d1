"""What the shared training loop (:mod:`pyrovae.train`) and the command line
(:mod:`pyrovae.cli`) ask of a model: one :class:`Recipe` per model, registered
with its config class in :data:`pyrovae.recipes.MODELS`.

The loop calls, in order: :meth:`Recipe.check` (through the config's
``check``), :meth:`Recipe.check_data` once on the training data,
:meth:`Recipe.prepare_data`, :meth:`Recipe.build`, :meth:`Recipe.objective`; per epoch
:meth:`Recipe.on_epoch_start`, :meth:`Recipe.prepare_batch` on each batch,
:meth:`Recipe.evaluate` on the test split (:meth:`Recipe.prepare_test`,
:meth:`Recipe.with_labels` for every batch and split); at
the end :meth:`Recipe.write_figures`. ``pyrovae sample MODEL RUN`` and
``pyrovae evaluate MODEL RUN`` add the recipe's own flags
(:meth:`Recipe.add_sample_arguments`, :meth:`Recipe.add_evaluate_arguments`)
and call :meth:`Recipe.sampler` and :meth:`Recipe.run_evaluate` (``evaluate
--samples`` scores the samples of :meth:`Recipe.sampler` too). Every method
but :meth:`build`, :meth:`objective` and :meth:`evaluate` has a default that
does nothing (or the plain thing), so neither the loop nor the command line
ever asks which model it holds.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from pyrovae.early_stopping import SELECT_BY_ELBO


class Recipe:
    """How one model is built, fed, evaluated and drawn."""

    evaluate_help = "the test bound of a trained run"
    """One line for ``pyrovae evaluate MODEL --help``."""

    select_by = SELECT_BY_ELBO
    """What ``--early-stopping`` maximises on the held-out examples: a key of
    :meth:`evaluate`'s dict and its name (:mod:`pyrovae.early_stopping`)."""

    def check(self, cfg) -> None:
        """Raise ``ValueError`` for settings that cannot work together (the
        config has checked each field's choices and bounds)."""

    def check_data(self, cfg, x: torch.Tensor) -> None:
        """Raise ``ValueError`` for training data the model cannot score; called
        once before training on the training split (the test split for lazy rows)."""

    def prepare_data(self, cfg, ds):
        """The data set as the model trains on it, after the held-out part is
        split off (M2 keeps the labels of a few examples); by default ``ds``."""
        return ds

    def with_labels(self, cfg, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A batch (training, held-out or test) as the model takes it given
        its labels ``y`` (M2 packs them beside x); by default ``x`` alone."""
        return x

    def build(self, cfg, ds) -> nn.Module:
        """The model (with ``model`` and ``guide``, or the objective's own
        interface) for data set ``ds`` (a :class:`~pyrovae.data.Dataset` or the
        :class:`~pyrovae.data.DataSpec` a checkpoint keeps)."""
        raise NotImplementedError

    def objective(self, cfg):
        """The training objective: an ELBO, or a loss that is not one with its
        own ``train_metric`` name (:mod:`pyrovae.infer.losses`)."""
        raise NotImplementedError

    def on_epoch_start(self, cfg, epoch: int, objective) -> None:
        """Called before each epoch (1-based): a schedule of the objective's settings."""

    def prepare_batch(self, cfg, x: torch.Tensor) -> torch.Tensor:
        """A training batch as the model takes it (binarised, rescaled, ...)."""
        return x

    def prepare_test(self, cfg, x: torch.Tensor) -> torch.Tensor:
        """The test split as the model takes it; by default as a training batch."""
        return self.prepare_batch(cfg, x)

    def evaluate(self, cfg, model, x_test: torch.Tensor) -> dict:
        """metrics.csv's test columns: the bound's named terms with the ``test_``
        prefix (:mod:`pyrovae.infer.bound`), at least ``test_elbo``."""
        raise NotImplementedError

    def write_figures(self, out: str, cfg, model, ds, x_test: torch.Tensor) -> None:
        """The model's own figures in the run folder ``out`` (samples, ...)."""

    # --- pyrovae sample | evaluate MODEL RUN ----------------------------------------------

    def add_sample_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Flags of ``pyrovae sample MODEL`` beyond every model's."""

    def sampler(self, model, cfg, ds, args: argparse.Namespace) -> tuple:
        """``(draw, title)`` for ``pyrovae sample``: ``draw(k)`` gives k samples
        as data (images in [0, 1]), ``title`` heads the figure; by default the
        model's own ``sample``."""
        if not hasattr(model, "sample"):  # M2 (--labelled) has no generative sampler yet
            raise ValueError(
                f"run {args.run!r} holds a {type(model).__name__}, which has no sample method: pyrovae sample cannot "
                f"draw from it; evaluate it with pyrovae evaluate {args.model} {args.run}"
            )
        return model.sample, f"samples, {cfg.model} on {ds.name}"

    def sample_steps(self, model, cfg, args: argparse.Namespace) -> int | None:
        """The steps :meth:`sampler` takes under ``--steps`` (``None``: one pass,
        a model without a sampler's flags)."""
        return None

    def add_evaluate_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Flags of ``pyrovae evaluate MODEL`` beyond every model's."""

    def run_evaluate(self, args: argparse.Namespace, model, cfg, x_test: torch.Tensor) -> dict:
        """What ``pyrovae evaluate MODEL RUN`` prints (lists go to the run's
        files, not the terminal); by default :meth:`evaluate`."""
        return self.evaluate(cfg, model, x_test)
