"""The ``conditional`` workload: one training step of a model's conditional
twin (``pyrovae train MODEL --conditional``) against the same step of the
model itself, its reference (issue 25: at most 1.02x).

Both twins are built by the recipes from the default configs
(:func:`pyrovae.recipes.recipe_for`, ``VAEConfig`` and ``DiffusionConfig``
resolved for images) and stepped as the training loop steps them per batch
(:func:`recipe_step`); the data are synthetic 28 x 28 images of 8-bit grey
levels with 10 classes, mnist5k's shape. The extra cost of the conditional
step is the labels: packed beside the batch and unpacked by
:class:`~pyrovae.recipes.conditional.ConditionalLoss` (which, for the chain,
also drops them to the null class with probability ``p_uncond``), checked and
turned into one-hot features, concatenated to the VAE's encoder and decoder
inputs or embedded and added to the U-Net's time embedding.

Besides the ratio of the median times (the table's), :func:`conditional_checks`
reports the spread of the ratio: each repeat times both twins one after the
other, so each repeat gives one ratio, and their quartiles say how far a load
burst moved it."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable

import pyro
import torch

from pyrovae.bench.harness import Case, Sizes, _bind

UNCONDITIONAL = "pyrovae trainer step, unconditional (reference)"
CONDITIONAL = "pyrovae trainer step, --conditional"
TARGET = 1.02
NUM_CLASSES = 10


def synthetic_images(n: int, sizes: Sizes, device: torch.device):
    """``pyrovae.data.Dataset`` of ``n`` images of ``sizes.image_shape`` (random
    8-bit levels in [0, 1]) with labels in [0, 10), train and test alike."""
    from pyrovae.data.spec import Dataset

    x = torch.randint(0, 256, (n, math.prod(sizes.image_shape)), device=device) / 255
    y = torch.arange(n, device=device) % NUM_CLASSES
    return Dataset("synthetic", x, y, x, y, sizes.image_shape)


def recipe_step(cfg, ds, device: torch.device) -> Callable:
    """``step(x, y)``: what ``pyrovae train`` does with each batch of ``cfg``'s
    run (:func:`pyrovae.train.train` per batch): the recipe's
    ``prepare_batch`` and ``with_labels``, the trainer's step
    (:func:`pyrovae.train.train_step` on the :class:`~pyrovae.train.LossModule`
    of the recipe's model and objective, the config's optimiser, clipping and
    precision) and the EMA update where the config keeps one. The
    learning-rate scheduler's step, the same for both twins, is left out."""
    from pyrovae.config import resolve
    from pyrovae.optim import make_optimizer
    from pyrovae.recipes import recipe_for
    from pyrovae.train import LossModule, make_averaged_model, train_step

    cfg = resolve(cfg.check())
    recipe = recipe_for(cfg)
    ds = recipe.prepare_data(cfg, ds)
    model = recipe.build(cfg, ds).to(device)
    loss_fn = LossModule(model, recipe.objective(cfg))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, parameters, cfg.lr)
    averaged = make_averaged_model(model, cfg.ema_decay)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        batch = recipe.with_labels(cfg, recipe.prepare_batch(cfg, x), y)
        train_step(loss_fn, parameters, optimizer, batch, cfg.grad_clip, cfg.precision)
        if averaged is not None:
            averaged.update_parameters(model)

    return step


def twin_configs(sizes: Sizes) -> dict:
    """``{name: (config, batch)}``: the default ``pyrovae train vae`` and
    ``pyrovae train diffusion`` configs (the U-Net on images), shrunk by
    ``sizes.conditional_vae`` / ``sizes.conditional_diffusion`` where they are
    given (the smoke sizes)."""
    from pyrovae.recipes import DiffusionConfig, VAEConfig

    vae = VAEConfig(**(sizes.conditional_vae or {}))
    chain = DiffusionConfig(**(sizes.conditional_diffusion or {}))
    return {
        f"vae batch {vae.batch_size}": (vae, vae.batch_size),
        f"diffusion unet T={chain.T} batch {chain.batch_size}": (chain, chain.batch_size),
    }


def conditional_cases(sizes: Sizes, device: torch.device):
    """Per model (the VAE; the diffusion chain with its U-Net, ``p_uncond``
    0.1): the trainer's step of the conditional twin against the model's own,
    on the default config's batch; the target is :data:`TARGET`."""
    for name, (cfg, batch) in twin_configs(sizes).items():
        pyro.clear_param_store()
        ds = synthetic_images(batch, sizes, device)
        variants = {}
        for variant, conditional in ((UNCONDITIONAL, False), (CONDITIONAL, True)):
            torch.manual_seed(0)
            step = recipe_step(dataclasses.replace(cfg, conditional=conditional), ds, device)
            variants[variant] = _bind(step, ds.x_train, ds.y_train)
        # the full repeats for the U-Net too (a step is ~0.3 s on one core): a 2% target needs them
        model = cfg.model
        yield Case(
            "conditional",
            name,
            variants,
            {CONDITIONAL: TARGET},
            {"model": model, "batch": batch},
            reference=UNCONDITIONAL,
        )


def conditional_checks(results: list) -> list:
    """Per conditional case: the ratio conditional / unconditional of the
    medians (the table's) and the quartiles of the per-repeat ratios (each
    repeat times the twins back to back), against :data:`TARGET`."""
    checks = []
    for case in dict.fromkeys(r.case for r in results if r.workload == "conditional"):
        rows = {r.variant: r for r in results if r.workload == "conditional" and r.case == case}
        ours, ref = rows[CONDITIONAL], rows[UNCONDITIONAL]
        paired = [a / b for a, b in zip(ours.times_ms, ref.times_ms)]
        q1, median, q3 = statistics.quantiles(paired, n=4, method="inclusive") if len(paired) > 1 else paired * 3
        ratio = ours.ms / ref.ms
        checks.append(
            {
                "check": f"conditional {case}: conditional / unconditional {ratio:.3f} (medians {ours.ms:.2f} / "
                f"{ref.ms:.2f} ms); per repeat: median {median:.3f}, quartiles {q1:.3f}-{q3:.3f} over "
                f"{len(paired)}; <= {TARGET:.2f} {'met' if ratio <= TARGET else 'MISSED'}",
                "ratio": ratio,
                "target": TARGET,
                "conditional_ms": ours.ms,
                "unconditional_ms": ref.ms,
                "paired_median": median,
                "paired_quartiles": [q1, q3],
                "repeats": len(paired),
            }
        )
    return checks
