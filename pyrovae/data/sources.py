"""Any source: a registered name or a path, told apart and loaded."""

from __future__ import annotations

import os

from pyrovae.data.arrays import load_npy, load_npz
from pyrovae.data.idx import IDX_STEMS, find_idx, load_idx_folder
from pyrovae.data.images import load_image_folder
from pyrovae.data.named import DATASETS, NAMED_LOADERS
from pyrovae.data.spec import DEFAULT_TEST_FRACTION, Dataset, DataSpec


def check_source(source: str) -> None:
    """Raise unless ``source`` is a registered name or an existing path. A bare
    word (no slash, no extension) that is neither is reported as an unknown
    name; anything else as a missing path."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"data must be a data set name or a path, got {source!r}")
    if source in NAMED_LOADERS or os.path.exists(source):
        return
    if os.sep not in source and "/" not in source and not os.path.splitext(source)[1]:
        raise ValueError(f"unknown data set {source!r}: not one of {', '.join(DATASETS)}, and no such path exists")
    raise FileNotFoundError(
        f"data path {source!r} does not exist (expected a folder of images, a .npy/.npz file or an IDX folder)"
    )


def load_dataset(
    name: str = "mnist5k",
    data_dir: str | None = None,
    *,
    image_size: int | None = None,
    layout: str = "auto",
    test_fraction: float = DEFAULT_TEST_FRACTION,
    lazy: bool | None = None,
) -> Dataset:
    """Load a data set by name (one of :data:`DATASETS`) or from a path.

    :param name: a registered name, or a path: a folder of images, a ``.npy``
        or ``.npz`` file, or a folder holding the four IDX files.
    :param data_dir: the folder of a named set's files (``fashion-mnist``).
    :param image_size: image folders: resize every image to H x H.
    :param layout: arrays: ``auto`` or the axis order (see :func:`array_layout`).
    :param test_fraction: the share of a path source's examples held out for
        test, by a seeded split; unused when the source has its own split.
    :param lazy: read a path source's rows from disk batch by batch (default:
        when they exceed :data:`EAGER_BYTES` as float32).
    """
    check_source(name)
    if name in NAMED_LOADERS:
        return NAMED_LOADERS[name](data_dir)
    if os.path.isdir(name):
        kind = "idx" if any(find_idx(name, stem) for stem in IDX_STEMS) else "images"
    elif name.endswith((".npy", ".npz")):
        kind = name[-3:]
    else:
        raise ValueError(
            f"data path {name!r} is a file but not .npy or .npz; "
            "expected a folder of images, a .npy/.npz array or a folder of IDX files"
        )
    for option, given, applies in (
        ("image_size", image_size is not None, ("images",)),
        ("layout", layout != "auto", ("npy", "npz")),
    ):
        if given and kind not in applies:
            raise ValueError(
                f"{option} does not apply to {name!r} (a source of kind {kind!r}; it applies to {', '.join(applies)})"
            )
    if kind == "idx":
        return load_idx_folder(name)
    if kind == "images":
        return load_image_folder(name, image_size, test_fraction, lazy)
    if kind == "npy":
        return load_npy(name, layout, test_fraction, lazy)
    return load_npz(name, layout, test_fraction)


def run_spec(ckpt: dict, cfg) -> DataSpec:
    """The data spec a checkpoint carries; a checkpoint from before specs
    were saved gets it from its config's data set, which must then be there."""
    if "data" in ckpt:
        return DataSpec.from_dict(ckpt["data"])
    return load_from_config(cfg).spec


def load_from_config(cfg) -> Dataset:
    """The data set a run's config names, with its data options."""
    return load_dataset(
        cfg.data, cfg.data_dir, image_size=cfg.image_size, layout=cfg.layout, test_fraction=cfg.test_fraction
    )
