"""Run configurations: one common training config and one config per model that
owns that model's defaults.

:class:`TrainConfig` holds what every run has (data, epochs, optimiser,
schedule, EMA, precision, run control); each model subclasses it with its own
fields and its own defaults, beside its recipe in :mod:`pyrovae.recipes`
(``VAEConfig``, ``HVAEConfig``, ``DiffusionConfig``, ``VDMConfig``, also
importable from here). The registry :data:`pyrovae.recipes.MODELS` maps a model
name to its config class and its recipe, so that ``pyrovae train NAME`` and
``train(TrainConfig(model=NAME))`` build the same config::

    from pyrovae.config import DiffusionConfig, TrainConfig
    DiffusionConfig(T=100)                     # the diffusion defaults, T changed
    TrainConfig(model="diffusion", T=100)      # the same config, by name
    TrainConfig(z_dim=3)                       # model="vae" is the default

This module imports no model: the registry is looked up when a config is
built. Adding a model is described in :mod:`pyrovae.recipes`. A default that
depends on the data (images or low-dimensional points) is the string
``"auto"`` in the field and is resolved by the config's
:meth:`TrainConfig.data_defaults`, which :func:`resolve` (the one place this
happens, called by :func:`pyrovae.train.train` for Python and CLI runs alike)
applies.

**Field metadata** (``dataclasses.fields(cls)[i].metadata``), from which the
command line is generated and :meth:`TrainConfig.check` validates::

    help     one line for ``--help``
    choices  the allowed values (a tuple of strings), where there is a fixed set
    ge, gt   inclusive / exclusive lower bound of a number
    le, lt   inclusive / exclusive upper bound of a number
    check    a function raising ``ValueError`` for a bad text value (``device``, ``time``)
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

import numpy as np

from pyrovae import data as datasets
from pyrovae.device import check_device_name, resolve_device
from pyrovae.optim import LR_SCHEDULES, OPTIMIZERS
from pyrovae.registry import lookup

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
    :data:`pyrovae.recipes.MODELS` registers for that name (``VAEConfig`` without ``model``)."""

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
        f"a data set ({', '.join(datasets.DATASETS)}) or a path: a folder of images, a .npy/.npz array, "
        "a folder of IDX files (docs/data.md)",
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
        "the compiled path: the VAE's/HVAE's loss (--elbo analytic) captured once per batch shape (torch.export) "
        "and compiled (torch.compile), no Python tracing per step; other objectives by torch.compile "
        "(docs/training.md)",
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
        from pyrovae.recipes import MODELS, recipe_for

        if type(self) is TrainConfig or MODELS.get(self.model, (None,))[0] is not type(self):
            raise ValueError(
                f"model {self.model!r} does not match its config class {type(self).__name__}; build configs with "
                f"TrainConfig(model=...) or one of {', '.join(c.__name__ for c, _ in MODELS.values())}"
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
        lookup(f.name, value, meta["choices"], note=what)
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


def config_class(model: str) -> type:
    """The config class :data:`pyrovae.recipes.MODELS` registers for ``model``."""
    from pyrovae.recipes import MODELS

    return lookup("model", model, MODELS).config


_MOVED = ("VAEConfig", "HVAEConfig", "DiffusionConfig", "VDMConfig", "MODELS", "Model", "recipe_for")


def __getattr__(name: str):
    """The model configs, the registry and :func:`~pyrovae.recipes.recipe_for`,
    which live with the recipes (:mod:`pyrovae.recipes`), under their old names
    here; imported on first use, so that importing this module imports no model."""
    if name in _MOVED:
        import pyrovae.recipes

        return getattr(pyrovae.recipes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    lookup("data kind", kind, DATA_KINDS)
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
    from pyrovae.recipes import MODELS

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
