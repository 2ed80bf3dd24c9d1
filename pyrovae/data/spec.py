"""The shape of a data set: :class:`DataSpec` (what a model needs to be
rebuilt, saved in every checkpoint), :class:`Dataset` (train and test rows
with their labels), :class:`LazyRows` (rows read from disk on demand) and the
seeded train/test splits every source uses."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

VALUES = ("unit", "real")  # pixels in [0, 1] (8-bit levels), or real-valued vectors
DEFAULT_TEST_FRACTION = 0.1
# Above this many bytes of float32 training rows a path source is read lazily.
EAGER_BYTES = 512 * 2**20
_SPLIT_SEED = 0


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its data, saved in every checkpoint.

    :param name: the data set's short name (for titles and run folders).
    :param image_shape: one example's shape, ``(C, H, W)`` or ``(D,)``.
    :param values: ``"unit"`` (pixel intensities in [0, 1], 8-bit levels) or
        ``"real"`` (real-valued vectors, e.g. ``moons``).
    :param classes: the names of the label classes 0..K-1 where they are known
        (an image folder's sorted sub-folders; a conditional run's labels), so
        that a run conditioned on them travels with them; empty otherwise.
    """

    name: str
    image_shape: tuple
    values: str = "unit"
    classes: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if self.values not in VALUES:
            raise ValueError(f"values must be one of {', '.join(VALUES)}, got {self.values!r}")
        if len(self.image_shape) not in (1, 3) or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) or (D,) with positive sizes, got {self.image_shape}")

    @property
    def x_dim(self) -> int:
        return math.prod(self.image_shape)

    @property
    def is_image(self) -> bool:
        return len(self.image_shape) == 3

    @property
    def channels(self) -> int | None:
        return self.image_shape[0] if self.is_image else None

    def to_dict(self) -> dict:
        spec = {"name": self.name, "image_shape": list(self.image_shape), "values": self.values}
        return {**spec, "classes": list(self.classes)} if self.classes else spec

    @classmethod
    def from_dict(cls, values: dict) -> DataSpec:
        return cls(
            values["name"], tuple(values["image_shape"]), values.get("values", "unit"), tuple(values.get("classes", ()))
        )

    def check_matches(self, other: DataSpec, what: str) -> None:
        """Raise ``ValueError`` unless ``other`` has this shape and value convention."""
        if (other.image_shape, other.values) != (self.image_shape, self.values):
            raise ValueError(
                f"{what} has examples of shape {other.image_shape} ({other.values} values), "
                f"but the model was trained on {self.image_shape} ({self.values} values)"
            )


class LazyRows(torch.utils.data.Dataset):
    """Rows of a source read from disk on demand: ``x[i]`` for an int or a list
    of indices is a float32 tensor (``(D,)`` or ``(n, D)``); ``x[a:b]`` is a
    view that reads nothing; :meth:`to` reads every row into one tensor.

    :param reader: a picklable callable, sorted source indices -> float32
        ``(n, D)`` array (so it can run in ``DataLoader`` worker processes).
    :param index: the source indices these rows are.
    """

    def __init__(self, reader, index: np.ndarray, dim: int):
        self.reader, self.index, self.dim = reader, np.asarray(index, dtype=np.int64), dim

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple:
        return (len(self), self.dim)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return LazyRows(self.reader, self.index[i], self.dim)
        i = np.asarray(i.cpu() if torch.is_tensor(i) else i, dtype=np.int64)
        wanted = self.index[i.reshape(-1)]
        # Sorted reads are sequential on disk; the rows go back into the asked order.
        order = np.argsort(wanted, kind="stable")
        rows = np.empty((len(wanted), self.dim), dtype=np.float32)
        rows[order] = self.reader(wanted[order])
        x = torch.from_numpy(rows)
        return x[0] if i.ndim == 0 else x

    def to(self, device) -> torch.Tensor:
        return self[np.arange(len(self))].to(device)


@dataclass
class Dataset:
    """Train and test rows (tensors on CPU until :meth:`to` moves them, or
    :class:`LazyRows` read from disk) and the shape of one example."""

    name: str
    x_train: torch.Tensor | LazyRows
    y_train: torch.Tensor
    x_test: torch.Tensor | LazyRows
    y_test: torch.Tensor
    image_shape: tuple
    values: str = "unit"
    classes: tuple = ()  # the class names, where the source has them (DataSpec.classes)

    @property
    def spec(self) -> DataSpec:
        return DataSpec(self.name, self.image_shape, self.values, self.classes)

    @property
    def x_dim(self) -> int:
        return int(np.prod(self.image_shape))

    @property
    def is_image(self) -> bool:
        return len(self.image_shape) == 3

    @property
    def lazy(self) -> bool:
        return isinstance(self.x_train, LazyRows)

    def to(self, device) -> Dataset:
        """Tensors moved to ``device``; lazy training rows stay on disk (each
        batch is moved as it is read), a lazy test split is read into one tensor."""
        x_train = self.x_train if self.lazy else self.x_train.to(device)
        return dataclasses.replace(
            self,
            x_train=x_train,
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )

    def hold_out(self, n: int, seed: int) -> tuple[Dataset, torch.Tensor | LazyRows, torch.Tensor]:
        """``(the rest, x_held_out, y_held_out)``: ``n`` training examples drawn
        by ``seed`` (a permutation of the training rows) and set apart; the rest,
        and the held-out rows, keep their order. Lazy rows stay on disk."""
        n_train = len(self.x_train)
        if not 1 <= n < n_train:
            raise ValueError(f"a held-out part must be >= 1 and < the {n_train} training examples, got {n}")
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
        held, rest = order[:n].sort().values, order[n:].sort().values
        kept = dataclasses.replace(self, x_train=take_rows(self.x_train, rest), y_train=take_rows(self.y_train, rest))
        return kept, take_rows(self.x_train, held), take_rows(self.y_train, held)

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """The first ``n_train`` / ``n_test`` examples (after the seeded shuffle)."""
        for name, n in (("n_train", n_train), ("n_test", n_test)):
            if n is not None and n < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {n}")
        return dataclasses.replace(
            self,
            x_train=self.x_train[:n_train],
            y_train=self.y_train[:n_train],
            x_test=self.x_test[:n_test],
            y_test=self.y_test[:n_test],
        )


def take_rows(x: torch.Tensor | LazyRows, idx: torch.Tensor) -> torch.Tensor | LazyRows:
    """Rows ``idx`` (an int64 CPU tensor) of ``x``: lazy rows stay lazy (nothing is read)."""
    if isinstance(x, LazyRows):
        return LazyRows(x.reader, x.index[idx.numpy()], x.dim)
    return x[idx.to(x.device)]


def stratified_split(y: np.ndarray, n_test: int, seed: int = _SPLIT_SEED):
    """Indices ``(train, test)`` with each class's share of the test set equal
    to its share of the data; both shuffled by ``seed``."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    test = []
    for c in classes:
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test.append(idx[: int(round(n_test * len(idx) / len(y)))])
    test = np.concatenate(test)
    train = np.setdiff1d(np.arange(len(y)), test)
    return rng.permutation(train), rng.permutation(test)


def split_rows(
    name: str, reader, n: int, shape: tuple, y: np.ndarray, test_fraction: float, lazy: bool | None
) -> Dataset:
    """A seeded train/test split of the ``n`` rows ``reader`` reads (stratified
    by ``y`` when it has more than one class); rows read now unless ``lazy``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if n < 2:
        raise ValueError(f"{name}: needs at least 2 examples for a train/test split, got {n}")
    n_test = min(n - 1, max(1, round(test_fraction * n)))
    if len(np.unique(y)) > 1:
        train, test = stratified_split(y, n_test)
    else:
        order = np.random.default_rng(_SPLIT_SEED).permutation(n)
        train, test = order[n_test:], order[:n_test]
    dim = math.prod(shape)
    lazy = len(train) * dim * 4 > EAGER_BYTES if lazy is None else lazy
    xs = [LazyRows(reader, idx, dim) for idx in (train, test)]
    if not lazy:
        xs = [x.to("cpu") for x in xs]
    y = torch.from_numpy(y)
    return Dataset(name, xs[0], y[train], xs[1], y[test], shape)


def source_label(source: str) -> str:
    """A data source's short name: a registered name itself, or a path's last
    part without its extension (``/data/cats/`` -> ``cats``, ``x.npy`` -> ``x``)."""
    base = os.path.basename(os.path.normpath(source))
    return os.path.splitext(base)[0] if base.endswith((".npy", ".npz")) else base
