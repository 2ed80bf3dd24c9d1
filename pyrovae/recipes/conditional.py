"""How ``pyrovae train vae|hvae|diffusion|vdm --conditional`` trains a model of
p(x | y) on the data's labels: the model's own recipe with the labels packed
beside each batch (:func:`~pyrovae.ssvae.pack_labels`, as M2's), the model
built with ``num_classes`` K (the run's class names, saved in its data spec so
they travel with it), its bound that of log p(x | y) at the real label, and the
figures a row of samples per class. For the chain and VDM the label is dropped
to the null class with probability ``p_uncond`` in training (classifier-free
guidance, Ho & Salimans 2022), so one network also gives eps(x_t, null)."""

from __future__ import annotations

import dataclasses
import os

import torch

from pyrovae import data as datasets
from pyrovae import plots
from pyrovae.ssvae import pack_labels, unpack_labels

LABELLED_SOURCES = (
    "the named sets (mnist5k, fashion-mnist, digits), image folders with class sub-folders, "
    ".npz files with a y array and IDX label files"
)
DIFFUSION_MODELS = ("diffusion", "vdm")


def num_classes(cfg, ds) -> int | None:
    """K for a conditional run (the data's or the run's class names), ``None`` otherwise."""
    return len(ds.classes) if getattr(cfg, "conditional", False) else None


def class_labels(ds: datasets.Dataset, source: str) -> tuple:
    """The class names of ``ds``'s labels: its own (an image folder's sub-folders),
    else ``"0"`` .. ``"K-1"`` for integer labels in [0, K); a one-line error
    for data without labels (every label 0) or with labels that are not classes."""
    y = ds.y_train
    if y is None or len(y) == 0 or len(y) != len(ds.x_train) or bool((y == y[0]).all()):
        raise ValueError(
            f"--conditional needs labelled data; data {source!r} has no labels ({LABELLED_SOURCES} carry them)"
        )
    if y.is_floating_point() or int(y.min()) < 0:
        raise ValueError(f"--conditional needs integer class labels >= 0, got values in [{y.min()}, {y.max()}]")
    k = max(int(y.max()), int(ds.y_test.max()) if len(ds.y_test) else 0) + 1
    if ds.classes:
        if len(ds.classes) < k:
            raise ValueError(f"data {source!r} names {len(ds.classes)} classes but has labels up to {k - 1}")
        return tuple(ds.classes)
    return tuple(str(c) for c in range(k))


class ConditionalLoss:
    """The model's objective given ``batch = pack_labels(x, y)``: its loss of
    x given y, with each label replaced by the null class -1 with probability
    ``p_uncond`` (classifier-free guidance's training; 0 for the VAEs). Every
    other attribute (``train_metric``, ``kl_scale``, ``time_sampler``) is the
    objective's own."""

    def __init__(self, objective, p_uncond: float = 0.0):
        object.__setattr__(self, "objective", objective)
        object.__setattr__(self, "p_uncond", p_uncond)

    def __getattr__(self, name: str):
        if name in ("objective", "p_uncond"):
            raise AttributeError(name)
        return getattr(self.objective, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.objective, name, value)

    def differentiable_loss(self, model, guide, batch: torch.Tensor) -> torch.Tensor:
        x, y = unpack_labels(batch)
        if self.p_uncond > 0:
            y = torch.where(torch.rand(y.shape, device=y.device) < self.p_uncond, -1, y)
        return self.objective.differentiable_loss(model, guide, x, y)


class ConditionalRecipe:
    """A model's recipe (``base``) turned into its conditional twin's; every
    hook it does not define is the base recipe's."""

    def __init__(self, base):
        self.base = base

    def __getattr__(self, name: str):
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def check(self, cfg) -> None:
        self.base.check(cfg)
        if cfg.compile:
            raise ValueError("--conditional runs eagerly: --compile is not supported with it")
        if getattr(cfg, "labelled", None) is not None:
            raise ValueError("--conditional trains on every label; --labelled (M2) hides most of them: choose one")
        if cfg.model in ("vae", "hvae"):
            if getattr(cfg, "net", "mlp") not in ("mlp", "auto") or cfg.prior == "vamp":
                raise ValueError(
                    f"--conditional concatenates y to the encoder's and decoder's inputs: it needs net 'mlp' and a "
                    f"prior other than 'vamp', got net {getattr(cfg, 'net', 'mlp')!r}, prior {cfg.prior!r}"
                )

    def prepare_data(self, cfg, ds: datasets.Dataset) -> datasets.Dataset:
        return dataclasses.replace(ds, classes=class_labels(ds, cfg.data))

    def objective(self, cfg) -> ConditionalLoss:
        p_uncond = getattr(cfg, "p_uncond", 0.0) if cfg.model in DIFFUSION_MODELS else 0.0
        return ConditionalLoss(self.base.objective(cfg), p_uncond)

    def with_labels(self, cfg, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pack_labels(x, y.to(x.device))

    def sampler(self, model, cfg, ds, args) -> tuple:
        """``(draw, title)`` for ``pyrovae sample`` (and ``evaluate --samples``): a
        :class:`LabelledDraw` over the labels ``--label`` asks for
        (:func:`sample_labels`); the chain and VDM through their own
        sampler flags, their denoiser fixed at each chunk's labels (and guided
        with ``--guidance``)."""
        from pyrovae.diffusion.denoisers import conditioned

        y, columns = sample_labels(args, cfg, ds, next(model.parameters()).device)
        if cfg.model in DIFFUSION_MODELS:
            title = self.base.sampler(conditioned(model, y[:1], args.guidance), cfg, ds, args)[1]

            def draw_y(y_chunk):
                return self.base.sampler(conditioned(model, y_chunk, args.guidance), cfg, ds, args)[0](len(y_chunk))
        else:
            title = f"samples, {cfg.model} on {ds.name}"

            def draw_y(y_chunk):
                return model.sample(len(y_chunk), y_chunk)

        title += ", rows: classes" if columns < len(y) else f", class {ds.classes[int(y[0])]}"
        if args.guidance is not None:
            title += f", w = {args.guidance:g}"
        return LabelledDraw(draw_y, y, columns), title

    def run_evaluate(self, args, model, cfg, xy_test: torch.Tensor) -> dict:
        """``pyrovae evaluate`` of a conditional run: the base recipe's, with the
        bound of log p(x | y) at each test image's own label."""
        x_test, y_test = unpack_labels(xy_test)
        if cfg.model in DIFFUSION_MODELS:  # the full bound: the denoiser fixed at the first N test labels
            from pyrovae.diffusion.denoisers import conditioned

            return self.base.run_evaluate(args, conditioned(model, y_test[: args.n]), cfg, x_test)
        overrides = {k: getattr(args, k) for k in ("test_particles", "iwae_k") if getattr(args, k, None) is not None}
        return self.evaluate(dataclasses.replace(cfg, **overrides), model, xy_test)

    @torch.no_grad()
    def evaluate(self, cfg, model, xy_test: torch.Tensor, batch_size: int = 500) -> dict:
        """The base recipe's test bound, of log p(x | y) at each test image's
        label. With ``iwae_k`` (a VAE or HVAE over classes) also the model's
        own marginal: ``test_iwae_marginal`` (log p(x) = log (1/K) sum_c
        p(x | c), each by IWAE-k), ``test_log_p_y_given_x`` and
        ``test_bayes_accuracy`` (:func:`~pyrovae.infer.iwae.class_marginal_iwae`),
        the check of issue 25's log p(x | y) - log p(x) <= log K on one model."""
        x_test, y_test = unpack_labels(xy_test)
        metrics = self.base.evaluate(cfg, model, x_test, batch_size, y=y_test)
        classes = getattr(getattr(model, "conditioning", None), "num_classes", None)
        if cfg.model not in DIFFUSION_MODELS and getattr(cfg, "iwae_k", 0) > 0 and classes:
            from pyrovae.infer.iwae import class_marginal_iwae

            marginal = class_marginal_iwae(model.model, model.guide, x_test, y_test, cfg.iwae_k, classes)
            metrics.update({f"test_{name}": value for name, value in marginal.items()})
        return metrics

    def write_figures(self, out: str, cfg, model, ds, xy_test: torch.Tensor) -> None:
        """``samples.png``: a row of 8 samples per class."""
        if not ds.is_image:
            return
        k = len(ds.classes)
        y = torch.arange(k, device=xy_test.device).repeat_interleave(8)
        images = sample_images(cfg, model, y)
        plots.save_image_grid(os.path.join(out, "samples.png"), images, ds.image_shape, 8, "samples, a row per class")


class LabelledDraw:
    """``pyrovae sample``'s ``draw(k)`` for a conditional run: the next ``k`` of
    :attr:`labels` drawn by ``draw_y(y)``; :attr:`columns` samples per grid row."""

    def __init__(self, draw_y, labels: torch.Tensor, columns: int):
        self.draw_y, self.labels, self.columns, self.done = draw_y, labels, columns, 0

    def __call__(self, k: int) -> torch.Tensor:
        y = self.labels[self.done : self.done + k]
        self.done += len(y)
        return self.draw_y(y)


def sample_labels(args, cfg, spec, device) -> tuple:
    """``(y, columns)`` for ``pyrovae sample`` of a conditional run: ``--label
    all`` (the default), ``--n`` samples (8 by default) of each class, a row per
    class; ``--label K`` (a number or a class name), ``--n`` samples of it. For
    ``pyrovae evaluate --samples N``, N samples balanced over the K classes
    (:func:`balanced_labels`). A clear error for a label the run does not have,
    or ``--guidance`` on a VAE."""
    if args.guidance is not None and cfg.model not in DIFFUSION_MODELS:
        raise ValueError(f"--guidance is classifier-free guidance of the chain and VDM; a {cfg.model} has none")
    classes = spec.classes
    k = len(classes)
    if getattr(args, "samples", 0):  # pyrovae evaluate
        return balanced_labels(args.samples, k, device), args.samples // k or 1
    if args.label in (None, "all"):
        per = args.n or 8
        return torch.arange(k, device=device).repeat_interleave(per), per
    if args.label in classes:
        label = classes.index(args.label)
    elif args.label.lstrip("-").isdigit() and 0 <= int(args.label) < k:
        label = int(args.label)
    else:
        raise ValueError(
            f"--label must be a class in [0, {k}) (or its name: {', '.join(classes)}) or all, got {args.label!r}"
        )
    return torch.full((args.n or 64,), label, device=device), 8


def balanced_labels(n: int, k: int, device=None) -> torch.Tensor:
    """``n`` labels balanced over ``k`` classes, in class order: ``n // k`` of
    each and one more of each of the first ``n % k``."""
    counts = torch.full((k,), n // k, device=device)
    counts[: n % k] += 1
    return torch.arange(k, device=device).repeat_interleave(counts)


def sample_images(
    cfg, model, y: torch.Tensor, steps: int | None = None, guidance: float | None = None, image: bool = True
):
    """Samples (images in [0, 1] where ``image``) of a conditional run's model, one per entry of ``y``:
    E[x | z, y] for the VAEs; the chain (respaced to ``steps``, default the
    run's ``sample_steps``) or VDM (``steps`` ancestral steps) with classifier-free
    ``guidance`` w, whose samples for w > 0 are not the model's p(x | y)."""
    from pyrovae.recipes.diffusion import from_chain_space

    if cfg.model not in DIFFUSION_MODELS:
        if guidance is not None:
            raise ValueError(f"--guidance is classifier-free guidance of the chain and VDM; a {cfg.model} has none")
        return model.sample(len(y), y)
    to_data = from_chain_space if image else (lambda x: x)
    if cfg.model == "diffusion":
        steps = steps or min(cfg.sample_steps, model.T)
        return to_data(model.sample(len(y), steps=steps, y=y, guidance=guidance))
    return to_data(model.sample(len(y), steps or cfg.sample_steps, y=y, guidance=guidance))
