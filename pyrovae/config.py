"""Run configurations: one common training config and one config per model that
owns that model's defaults.

:class:`TrainConfig` holds what every run has (data, epochs, optimiser,
schedule, EMA, precision, run control); each model subclasses it with its own
fields and its own defaults (:class:`VAEConfig`, :class:`DiffusionConfig`).
The registry :data:`MODELS` maps a model name to its config class and its
recipe (:mod:`pyrovae.recipes`), so that ``pyrovae train NAME`` and
``train(TrainConfig(model=NAME))`` build the same config::

    from pyrovae.config import DiffusionConfig, TrainConfig
    DiffusionConfig(T=100)                     # the diffusion defaults, T changed
    TrainConfig(model="diffusion", T=100)      # the same config, by name
    TrainConfig(z_dim=3)                       # model="vae" is the default

**Adding a model** is three steps: a dataclass ``XConfig(TrainConfig)`` here
whose ``model`` field defaults to the name (``model: str = override("model",
"x")``), its own fields declared with :func:`option`, and changed common
defaults with :func:`override`; a recipe class in ``pyrovae/recipes/x.py``;
one line in :data:`MODELS`. A default that depends on the data (images or
low-dimensional points) is the string ``"auto"`` in the field and is resolved
by the config's :meth:`TrainConfig.data_defaults`, which :func:`resolve` (the
one place this happens, called by :func:`pyrovae.train.train` for Python and
CLI runs alike) applies.

**Field metadata** (``dataclasses.fields(cls)[i].metadata``), from which the
command line is generated and :meth:`TrainConfig.check` validates:

    help     one line for ``--help``
    choices  the allowed values (a tuple of strings), where there is a fixed set
    ge, gt   inclusive / exclusive lower bound of a number
    le, lt   inclusive / exclusive upper bound of a number
    check    a function that raises ``ValueError`` for a bad value of a text field
             (``device``'s spelling, VDM's ``time``)
    cli      False for a field that is no flag (``model``: the subcommand)

The type annotation says the rest: ``int | None`` may be None (no flag value:
off), ``list[int]`` takes one or more values, ``bool`` fields default to
``False`` except ``validate`` (whose flag is ``--no-validate``).

Configs written by older versions (one flat config for every model) are
converted on read by :meth:`TrainConfig.from_dict`: the fields of the other
model are dropped, renamed values are mapped.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from pyrovae import data as datasets
from pyrovae.device import check_device_name, resolve_device
from pyrovae.diffusion.chain import PARAMETERIZATIONS, VARIANCES
from pyrovae.diffusion.gamma import SCHEDULES as GAMMA_SCHEDULES
from pyrovae.diffusion.schedule import SCHEDULES
from pyrovae.hvae import ENCODERS as HVAE_ENCODERS
from pyrovae.infer.diffusion_elbo import TIME_SAMPLERS
from pyrovae.infer.elbos import ELBOS
from pyrovae.infer.losses import OBJECTIVES
from pyrovae.optim import LR_SCHEDULES, OPTIMIZERS
from pyrovae.parts.encoders import GUIDES
from pyrovae.parts.likelihoods import LIKELIHOODS
from pyrovae.parts.priors import PRIORS
from pyrovae.recipes.conditional import ConditionalRecipe
from pyrovae.recipes.diffusion import NETS as DIFFUSION_NETS
from pyrovae.recipes.diffusion import DiffusionRecipe
from pyrovae.recipes.hvae import HVAERecipe
from pyrovae.recipes.ssvae import SSVAERecipe
from pyrovae.recipes.vae import VAERecipe
from pyrovae.recipes.vdm import NETS as VDM_NETS
from pyrovae.recipes.vdm import VDMRecipe, parse_time
from pyrovae.vae import NETS as VAE_NETS

AUTO = "auto"
PRECISIONS = ("fp32", "bf16")
NAN_POLICIES = ("stop", "skip")
# Fields that may change when a run is resumed: they steer the run, not the maths.
RESUMABLE_FIELDS = (
    "epochs",
    "out",
    "device",
    "quiet",
    "validate",
    "eval_every",
    "tensorboard",
    "resume",
    "nan_policy",
    "compile",
    "overwrite",
)


def option(default, help: str, *, choices=None, ge=None, gt=None, le=None, lt=None, check=None, cli: bool = True):
    """A config field: its default and the metadata the CLI and :meth:`TrainConfig.check` read."""
    meta = {"help": help, "cli": cli}
    for key, value in (("choices", choices), ("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("check", check)):
        if value is not None:
            # a registry stays itself: its lookups may accept other spellings (LIKELIHOODS' aliases)
            meta[key] = tuple(value) if key == "choices" and not isinstance(value, dict) else value
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def override(name: str, default, **changes):
    """A common field of :class:`TrainConfig` with a model's own default (and
    optionally changed metadata, e.g. its help)."""
    base = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    meta = {**base.metadata, **changes}
    return option(default, meta.pop("help"), **{k: v for k, v in meta.items() if k != "cli"}, cli=meta["cli"])


class _ByModel(type):
    """``TrainConfig(model="diffusion", ...)`` builds the config class that
    :data:`MODELS` registers for that name (``VAEConfig`` without ``model``)."""

    def __call__(cls, *args, **kwargs):
        if cls is TrainConfig:
            cls = config_class(kwargs.get("model", "vae"))
        names = [f.name for f in dataclasses.fields(cls)]
        for name in kwargs:
            if name not in names:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; its fields: {', '.join(names)}"
                raise TypeError(f"{name!r} is not a field of the {cls.model} config ({cls.__name__}){hint}")
        return type.__call__(cls, *args, **kwargs)


@dataclass
class TrainConfig(metaclass=_ByModel):
    """Everything every run depends on; saved as ``config.json`` in the run
    folder. Not built itself: ``TrainConfig(model=NAME, ...)`` returns that
    model's config (a subclass with its own fields and defaults)."""

    model: str = option("vae", "the model to train (the subcommand of `pyrovae train`)", cli=False)
    data: str = option(
        "mnist5k",
        f"a data set ({', '.join(datasets.DATASETS)}) or a path: a folder of images, a .npy/.npz array, a folder of IDX files (docs/data.md)",
    )
    data_dir: str | None = option(None, "folder with the dataset's files (fashion-mnist IDX files)")
    image_size: int | None = option(None, "image folders: resize every image to H x H", ge=1)
    layout: str = option("auto", "arrays: axis order (auto: the rule in docs/data.md)", choices=datasets.LAYOUTS)
    test_fraction: float = option(
        datasets.DEFAULT_TEST_FRACTION,
        "share of a path source held out for test by a seeded split, when it has no split of its own",
        gt=0,
        lt=1,
    )
    num_workers: int = option(0, "DataLoader worker processes reading the training batches", ge=0)
    train_size: int | None = option(None, "use only the first N training examples", ge=1)
    test_size: int | None = option(None, "use only the first N test examples", ge=1)
    epochs: int = option(300, "passes over the training set", ge=1)
    batch_size: int = option(128, "examples per optimiser step (the global batch under torchrun)", ge=1)
    lr: float = option(1e-3, "learning rate", gt=0, lt=math.inf)
    seed: int = option(0, "random seed", ge=0, lt=2**32)  # NumPy's seeds are 32-bit
    device: str = option(AUTO, "auto | cpu | cuda | cuda:N", check=check_device_name)
    out: str | None = option(None, "run folder (default runs/<model>-<data>-<timestamp>-<process id>)")
    validate: bool = option(
        True, "pyro.enable_validation during training (the flag --no-validate turns it off: faster)"
    )
    quiet: bool = option(False, "no progress bars or per-epoch lines")
    optimizer: str = option(
        "adam",
        "torch optimiser over all parameters (clippedadam: Pyro's, clamps each gradient entry to 10)",
        choices=OPTIMIZERS,
    )
    lr_schedule: str = option(
        "constant", "learning-rate schedule, stepped every step (cosine: to 0 at the last step)", choices=LR_SCHEDULES
    )
    lr_gamma: float = option(1.0, "lr factor per epoch of the exponential schedule", gt=0, le=1)
    warmup_steps: int = option(0, "linear learning-rate warm-up over N steps", ge=0)
    grad_clip: float | None = option(
        None,
        "clip the global gradient norm to this (None: no clipping; the norm is logged either way)",
        gt=0,
        lt=math.inf,
    )
    ema_decay: float | None = option(
        None,
        "keep an exponential moving average of the weights with this decay (e.g. 0.999); evaluate and sample with it",
        gt=0,
        lt=1,
    )
    eval_every: int = option(1, "test ELBO every N epochs (and after the last)", ge=1)
    precision: str = option("fp32", "bf16: torch.autocast around the loss", choices=PRECISIONS)
    compile: bool = option(
        False,
        "the compiled path: the VAE's/HVAE's loss (--elbo analytic) captured once per batch shape (torch.export) and compiled (torch.compile), no Python tracing per step; other objectives by torch.compile (docs/training.md)",
    )
    tensorboard: bool = option(False, "also log metrics to TensorBoard (needs the tensorboard package)")
    resume: str | None = option(None, "continue the run in this folder (or checkpoint file) with its saved settings")
    overwrite: bool = option(False, "replace the run that the run folder holds (without it such a folder is refused)")
    nan_policy: str = option(
        "stop",
        "a NaN/inf loss or gradient: stop (keeping the last checkpoint) or skip the step and count it",
        choices=NAN_POLICIES,
    )
    test_particles: int = option(10, "particles per test example for the test ELBO", ge=1)
    early_stopping: int | None = option(
        None,
        "stop after N epochs without a higher ELBO on the held-out examples (--held-out); the best epoch's weights "
        "are the run's model (model.pt, pyrovae.load); none: off",
        ge=1,
    )
    conditional: bool = option(
        False,
        "train a model of p(x | y) on the data's class labels (CVAE; the chain's and VDM's denoiser embeds y)",
    )
    held_out: int | None = option(
        None,
        "with early stopping: training examples held out by a seeded draw and never trained on (none: 10% of the "
        "training split)",
        ge=1,
    )

    def __post_init__(self):
        # Values as the fields hold them, so that config.json can be written: a NumPy number
        # (a sweep over np.arange) as a Python one, a path as a string, a tuple as a list.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            elif isinstance(value, tuple) and f.type.startswith("list"):
                value = list(value)
            if isinstance(value, list):
                value = [v.item() if isinstance(v, np.generic) else v for v in value]
            elif isinstance(value, np.generic):
                value = value.item()
            setattr(self, f.name, value)

    def data_defaults(self, kind: str) -> dict:
        """The values of this model's ``"auto"`` fields for data of ``kind``
        (``"image"`` or ``"points"``); none for the common fields."""
        return {}

    def check(self) -> TrainConfig:
        """Raise ``ValueError`` naming the first bad field: choices and bounds
        from the fields' metadata, then the model recipe's own rules."""
        if type(self) is TrainConfig or MODELS.get(self.model, (None,))[0] is not type(self):
            raise ValueError(
                f"model {self.model!r} does not match its config class {type(self).__name__}; build configs with TrainConfig(model=...) or one of {', '.join(c.__name__ for c, _ in MODELS.values())}"
            )
        for f in dataclasses.fields(self):
            check_field(f, getattr(self, f.name))
        datasets.check_source(self.data)
        recipe_for(self).check(resolve(self))
        resolve_device(self.device)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from a saved dict (``config.json``, a checkpoint's
        ``config``): its ``model`` (``"vae"`` when absent) picks the class;
        fields it lacks take their defaults; configs of the old flat format
        are converted (:func:`convert_legacy`); keys starting with ``_`` are
        notes for a reader (``config.json``'s ``_note``) and are skipped;
        unknown names are an error."""
        values = convert_legacy({k: v for k, v in values.items() if not k.startswith("_")})
        target = config_class(values.get("model", "vae"))
        names = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(
                f"unknown config fields {unknown} for model {target.model!r}; this pyrovae knows {sorted(names)}"
            )
        return target(**values)


def check_field(f: dataclasses.Field, value) -> None:
    """One field against its metadata: a ``ValueError`` naming it, what was expected and what was given."""
    meta = f.metadata
    if value is None:
        if "None" not in str(f.type):
            raise ValueError(f"{f.name} must not be None")
        return
    if "check" in meta:
        meta["check"](value)
    if "choices" in meta and value not in meta["choices"]:
        what = meta["help"].split(";")[0].split(" (")[0]
        raise ValueError(f"unknown {f.name} {value!r} ({what}); expected one of {', '.join(map(str, meta['choices']))}")
    if str(f.type).startswith("list") and not isinstance(value, list):
        raise ValueError(f"{f.name} must be a list, e.g. [{value!r}], got {value!r}")
    values = value if isinstance(value, list) else [value]
    whole = "int" in str(f.type) and "float" not in str(f.type)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            if any(k in meta for k in ("ge", "gt", "le", "lt")):
                raise ValueError(f"{f.name} must be a number, got {value!r}")
            continue
        if whole and not isinstance(v, numbers.Integral):
            least = f" >= {meta['ge']}" if "ge" in meta else ""
            raise ValueError(f"{f.name} must be an integer{least}, got {value!r}")
        for key, ok, word in (
            ("ge", v >= meta.get("ge", 0), ">="),
            ("gt", v > meta.get("gt", 0), ">"),
            ("le", v <= meta.get("le", 0), "<="),
            ("lt", v < meta.get("lt", 0), "<"),
        ):
            if key in meta and not ok:
                raise ValueError(f"{f.name} must be {word} {meta[key]}, got {value!r}")


@dataclass
class VAEConfig(TrainConfig):
    """``pyrovae train vae``: a VAE by SVI (the common fields' defaults as they are)."""

    model: str = override("model", "vae")
    binarize: str = option(
        "dynamic", "binarisation of pixel values for the Bernoulli likelihood", choices=datasets.BINARIZE
    )
    z_dim: int = option(50, "latent size", ge=1)
    hidden: list[int] = option([400], "hidden layer sizes of the encoder (the decoder mirrors them)", ge=1)
    elbo: str = option("analytic", "ELBO estimator", choices=ELBOS)
    kl_warmup: int = option(0, "KL weight rises linearly from 0 to 1 over this many epochs (0: no warm-up)", ge=0)
    prior: str = option("normal", "prior p(z)", choices=PRIORS)
    guide: str = option("diag", "encoder q(z|x)", choices=GUIDES)
    likelihood: str = option("bernoulli", "p(x|z); only bernoulli binarises the data", choices=LIKELIHOODS)
    net: str = option("mlp", "encoder/decoder networks (conv needs image data)", choices=VAE_NETS)
    iwae_k: int = option(0, "IWAE-k log-likelihood on the test split after each evaluation (0: off)", ge=0)
    labelled: int | None = option(
        None,
        "train the semi-supervised VAE (M2) with this many labels, balanced over the classes (seeded)",
        ge=1,
    )
    aux_weight: float = option(46.0, "M2 (--labelled): weight alpha of the classification term alpha log q(y|x)", ge=0)
    classes: int = option(10, "M2 (--labelled): the number of classes K, labels in [0, K)", ge=2)


@dataclass
class HVAEConfig(TrainConfig):
    """``pyrovae train hvae``: a hierarchical VAE (L layers of latents) by SVI; by default the VAE with a
    second latent layer on top, bottom-up, with a 50-epoch KL warm-up: the best shape and recipe measured
    here (docs/hvae.md)"""

    model: str = override("model", "hvae")
    binarize: str = option(
        "dynamic", "binarisation of pixel values for the Bernoulli likelihood", choices=datasets.BINARIZE
    )
    z_dims: list[int] = option([50, 20], "latent sizes z_1 (next to the data) .. z_L (the top)", ge=1)
    hidden: list[int] = option(
        [400, 200], "hidden width of each layer's networks (one per layer, or one for all)", ge=1
    )
    depth: int = option(1, "hidden layers of that width in each layer's networks", ge=1)
    encoder: str = option(
        "bottom-up",
        "q(z|x): bottom-up (IWAE paper; Monte Carlo KL below the top) or top-down (Ladder VAE, every KL exact)",
        choices=HVAE_ENCODERS,
    )
    elbo: str = option("analytic", "ELBO estimator", choices=ELBOS)
    kl_warmup: int = option(
        50,
        "KL weight rises linearly from 0 to 1 over this many epochs (0: no warm-up; the default 50 gave "
        "+1.35 nats IWAE-1000 on MNIST-5k, docs/hvae.md)",
        ge=0,
    )
    prior: str = option("normal", "prior p(z_L) of the top layer (vamp needs the top-down encoder)", choices=PRIORS)
    likelihood: str = option("bernoulli", "p(x|z_1); only bernoulli binarises the data", choices=LIKELIHOODS)
    iwae_k: int = option(0, "IWAE-k log-likelihood on the test split after each evaluation (0: off)", ge=0)


@dataclass
class _DiffusionTraining(TrainConfig):
    """The optimiser settings the diffusion chain and VDM share: small batches, a
    lower learning rate, EMA weights for evaluation and a one-draw-per-image
    (unbiased) per-epoch test bound."""

    epochs: int = override("epochs", 20)
    batch_size: int = override("batch_size", 64)
    lr: float = override("lr", 5e-4)
    ema_decay: float | None = override("ema_decay", 0.995)
    eval_every: int = override("eval_every", 5)
    test_particles: int = override(
        "test_particles", 1, help="draws of t per test example for the per-epoch (unbiased) test ELBO"
    )
    p_uncond: float = option(
        0.1,
        "--conditional: probability that a training label is dropped to the null class (classifier-free guidance)",
        ge=0,
        lt=1,
    )


@dataclass
class DiffusionConfig(_DiffusionTraining):
    """``pyrovae train diffusion``: a diffusion chain. Its defaults give
    digit-like samples and about 2 bits/dim on mnist5k in minutes on 2 CPU
    cores (docs/diffusion.md), with EMA weights for evaluation; ``objective``,
    ``variance`` and ``net`` follow the data (:meth:`data_defaults`)."""

    model: str = override("model", "diffusion")
    T: int = option(1000, "number of diffusion steps", ge=1)
    schedule: str = option("linear", "noise schedule beta_t", choices=SCHEDULES)
    net: str = option(AUTO, "denoiser (auto: unet for images, mlp for 2-D data)", choices=DIFFUSION_NETS)
    channels: int = option(16, "U-Net base channels", ge=1)
    hidden: list[int] = option([256, 256, 256], "MLP denoiser widths", ge=1)
    objective: str = option(
        AUTO,
        "elbo (the bound), simple (Ho et al.'s L_simple, not the ELBO) or hybrid (learned variances); auto: hybrid for images, elbo for 2-D data",
        choices=(AUTO, *OBJECTIVES),
    )
    parameterization: str = option("eps", "what the denoiser predicts", choices=PARAMETERIZATIONS)
    variance: str = option(
        AUTO,
        "sigma_t^2 of p_theta(x_{t-1}|x_t); auto: learned for images, beta_tilde for 2-D data",
        choices=(AUTO, *VARIANCES),
    )
    time_sampler: str = option("uniform", "how t is drawn per example", choices=TIME_SAMPLERS)
    sample_steps: int = option(50, "respaced steps for the samples figure", ge=1)

    def data_defaults(self, kind: str) -> dict:
        # improved DDPM's hybrid objective with learned variances is what gets
        # images to ~2 bits/dim in minutes; the 2-D toys train best on the
        # plain bound with fixed variances.
        image = kind == "image"
        return {
            "objective": "hybrid" if image else "elbo",
            "variance": "learned" if image else "beta_tilde",
            "net": "unet" if image else "mlp",
        }


@dataclass
class VDMConfig(_DiffusionTraining):
    """``pyrovae train vdm``: a variational diffusion model, continuous time with a
    learned noise schedule (see docs/vdm), for 8-bit images, with the diffusion
    chain's optimiser settings and EMA weights for evaluation; 28 epochs, about
    10 CPU minutes on mnist5k, where it reaches 1.78 bits/dim (docs/vdm.md)."""

    model: str = override("model", "vdm")
    epochs: int = override(
        "epochs",
        28,
        help="passes over the training set (28: the 10 minutes of one CPU thread on mnist5k that docs/vdm.md measures)",
    )
    schedule: str = option(
        "learned-linear",
        "noise schedule gamma(t): fixed linear, linear with learned end points, or VDM's monotone network",
        choices=GAMMA_SCHEDULES,
    )
    time: str = option(
        "continuous",
        "continuous (the bound L_inf) or a number of steps T (the T-step model and its bound L_T)",
        check=parse_time,
    )
    fourier: bool = option(False, "Fourier features sin, cos(2^n 2 pi z_t), n = 6, 7, as extra denoiser inputs")
    minimise_variance: bool = option(
        False, "train the schedule's interior to minimise the bound estimate's variance (learned-net, continuous time)"
    )
    net: str = option("unet", "denoiser", choices=VDM_NETS)
    channels: int = option(16, "U-Net base channels", ge=1)
    hidden: list[int] = option([256, 256, 256], "MLP denoiser widths", ge=1)
    sample_steps: int = option(100, "ancestral steps for the samples figure", ge=1)


class Model(NamedTuple):
    config: type
    recipe: object


MODELS = {
    "vae": Model(VAEConfig, VAERecipe()),
    "hvae": Model(HVAEConfig, HVAERecipe()),
    "diffusion": Model(DiffusionConfig, DiffusionRecipe()),
    "vdm": Model(VDMConfig, VDMRecipe()),
}


def recipe_for(cfg: TrainConfig):
    """The recipe that trains ``cfg``: its model's, or M2's for a VAE given ``labelled``."""
    if getattr(cfg, "labelled", None) is not None:
        return SSVAERecipe()
    if getattr(cfg, "conditional", False):
        return ConditionalRecipe(MODELS[cfg.model].recipe)
    return MODELS[cfg.model].recipe


def config_class(model: str) -> type:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {', '.join(MODELS)}")
    return MODELS[model].config


DATA_KINDS = ("image", "points")


def data_kind(data: str) -> str:
    """``"image"`` for the data set ``data`` of images, ``"points"`` for
    low-dimensional real-valued data (the 2-D toys)."""
    return "points" if data in datasets.TOY_DATASETS else "image"


def resolve(cfg: TrainConfig, kind: str | None = None) -> TrainConfig:
    """``cfg`` with each ``"auto"`` field set to the model's default for data of
    ``kind`` (default: :func:`data_kind` of ``cfg.data``;
    :meth:`TrainConfig.data_defaults`); fields given explicitly are kept. The
    one place where data-dependent defaults are decided."""
    kind = kind or data_kind(cfg.data)
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {', '.join(DATA_KINDS)}")
    chosen = {k: v for k, v in cfg.data_defaults(kind).items() if getattr(cfg, k) == AUTO}
    return dataclasses.replace(cfg, **chosen) if chosen else cfg


# The one flat config of pyrovae <= 0.1 (both models' fields in one class).
_LEGACY_FIELDS = {
    "model",
    "data",
    "data_dir",
    "binarize",
    "train_size",
    "test_size",
    "epochs",
    "batch_size",
    "lr",
    "z_dim",
    "hidden",
    "elbo",
    "kl_warmup",
    "prior",
    "guide",
    "likelihood",
    "iwae_k",
    "test_particles",
    "seed",
    "device",
    "out",
    "validate",
    "quiet",
    "optimizer",
    "lr_schedule",
    "lr_gamma",
    "warmup_steps",
    "grad_clip",
    "ema_decay",
    "eval_every",
    "precision",
    "tensorboard",
    "resume",
    "nan_policy",
    "T",
    "schedule",
    "net",
    "channels",
    "objective",
    "parameterization",
    "variance",
    "time_sampler",
    "sample_steps",
}


def convert_legacy(values: dict) -> dict:
    """A saved config dict in the current format: an old flat config (it holds
    fields of both models) loses the other model's fields, and the old VAE's
    ``net="auto"`` (which meant the MLP) becomes ``"mlp"``."""
    model = values.get("model", "vae")
    if model not in MODELS:
        return values
    names = {f.name for f in dataclasses.fields(MODELS[model].config)}
    foreign = (set(values) & _LEGACY_FIELDS) - names
    if not foreign:
        return values
    values = {k: v for k, v in values.items() if k not in foreign}
    if model == "vae" and values.get("net") == AUTO:
        values["net"] = "mlp"
    return values
