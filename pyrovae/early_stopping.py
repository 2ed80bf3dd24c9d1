"""Early stopping on a held-out part of the training split.

With ``early_stopping = P`` (``--early-stopping P``) the trainer sets apart
``held_out`` training examples (``--held-out N``; default 10% of the training
split, after ``train_size``), drawn by the run's seed and never trained on.
After every epoch it computes their ELBO with the weights it evaluates with
(the EMA's when there is one), by the recipe's test evaluation, always with
the same random draws (the seed's own stream, so that two epochs' figures
differ by the weights only and the training stream is untouched). The run
stops once P epochs in a row have not raised the best held-out ELBO (for M2,
the held-out accuracy of q_phi(y | x): its recipe's ``select_by``), counted
from the end of a KL warm-up (``kl_warmup``: until then the training objective
is not the ELBO; the rule of the HVAE table in docs/hvae.md). The weights of the
best epoch are the run's model: ``model.pt``, what :func:`pyrovae.load`
returns and what the figures are drawn with. The checkpoint keeps the last
epoch's training state as always, and the best epoch, its ELBO and its
weights beside it, so that a resumed run continues the count.
"""

from __future__ import annotations

import math

import torch

DEFAULT_HELD_OUT_FRACTION = 0.1


def held_out_size(cfg, n_train: int) -> int | None:
    """How many training examples ``cfg`` holds out: ``None`` without early
    stopping, else ``cfg.held_out`` or :data:`DEFAULT_HELD_OUT_FRACTION` of
    the ``n_train`` examples (at least 1). A ``ValueError`` names a held-out
    part without early stopping or one that leaves nothing to train on."""
    if cfg.early_stopping is None:
        if cfg.held_out is not None:
            raise ValueError(
                f"held_out ({cfg.held_out}) is the set early stopping watches: it needs early_stopping "
                "(--early-stopping PATIENCE)"
            )
        return None
    n = cfg.held_out if cfg.held_out is not None else max(1, round(DEFAULT_HELD_OUT_FRACTION * n_train))
    if n >= n_train:
        raise ValueError(
            f"held_out must be < the {n_train} training examples (after train_size), so that some are trained on, "
            f"got {n}"
        )
    return n


#: What early stopping watches by default: the held-out ELBO.
SELECT_BY_ELBO = ("test_elbo", "ELBO")
#: M2's rule (:class:`pyrovae.recipes.ssvae.SSVAERecipe`): the held-out
#: accuracy of q_phi(y | x), the rule of Pyro's ss_vae_M2 example.
SELECT_BY_ACCURACY = ("test_accuracy", "accuracy")


class EarlyStopping:
    """The best held-out score so far (the ELBO, or what ``select_by`` names),
    its epoch and its weights.

    :param patience: epochs without a higher held-out score before stopping.
    :param x_held_out: the held-out examples, prepared as a test split is.
    :param seed: the seed of the held-out evaluation's random draws.
    :param warmup: epochs of KL warm-up; the patience counts from their end.
    :param select_by: ``(key, name)``: the key of the recipe's evaluation that
        is maximised and its name in messages (:data:`SELECT_BY_ELBO`,
        :data:`SELECT_BY_ACCURACY`).
    """

    def __init__(self, patience: int, x_held_out: torch.Tensor, seed: int, warmup: int = 0, select_by=SELECT_BY_ELBO):
        self.patience, self.x_held_out, self.seed, self.warmup = patience, x_held_out, seed, warmup
        self.key, self.name = select_by
        self.best_epoch, self.best_score, self.best_weights = 0, -math.inf, None
        self.last = {}

    @property
    def last_elbo(self) -> float:
        return self.last.get("test_elbo", math.nan)

    def evaluate(self, recipe, cfg, model) -> float:
        """The held-out score of ``model`` (the ELBO in nats per example, or
        ``select_by``'s), with the same draws every epoch."""
        device = self.x_held_out.device
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
            torch.manual_seed(self.seed)
            self.last = recipe.evaluate(cfg, model, self.x_held_out)
        return self.last[self.key]

    def update(self, epoch: int, score: float, model: torch.nn.Module, ema: torch.nn.Module | None) -> None:
        """Keep ``epoch``'s weights (the model's, and the EMA's) if ``score`` is
        the best so far (the first of equal scores is kept)."""
        if score > self.best_score:
            self.best_epoch, self.best_score = epoch, score
            self.best_weights = {
                "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "ema": None if ema is None else {k: v.detach().clone() for k, v in ema.state_dict().items()},
            }

    def exhausted(self, epoch: int) -> bool:
        """Whether ``patience`` epochs up to ``epoch`` have passed since the best (and the warm-up)."""
        return self.best_epoch > 0 and epoch - max(self.best_epoch, self.warmup) >= self.patience

    def metrics(self) -> dict:
        """The columns a metrics row gets: the last held-out ELBO (and the
        watched score, where it is another), and the best epoch so far."""
        row = {"held_out_elbo": self.last_elbo}
        if self.key != "test_elbo":
            row["held_out_" + self.key.removeprefix("test_")] = self.last.get(self.key, math.nan)
        return {**row, "best_epoch": self.best_epoch}

    def state_dict(self) -> dict:
        return {
            "held_out": len(self.x_held_out),
            "select_by": self.key,
            "best_epoch": self.best_epoch,
            "best_elbo": self.best_score,
            "last": dict(self.last),
            **(self.best_weights or {"model": None, "ema": None}),
        }

    def load_state_dict(self, state: dict) -> None:
        # checkpoints before select_by watched the ELBO and kept only its last value
        if state.get("select_by", "test_elbo") != self.key:
            raise ValueError(
                f"the checkpoint's early stopping watched {state.get('select_by', 'test_elbo')!r}, this run "
                f"watches {self.key!r}"
            )
        self.best_epoch, self.best_score = state["best_epoch"], state["best_elbo"]
        self.last = state.get("last", {"test_elbo": state.get("last_elbo", math.nan)})
        self.best_weights = None if state["model"] is None else {"model": state["model"], "ema": state["ema"]}
