"""IDX files (LeCun's MNIST format) and folders holding the four of them."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import torch

from pyrovae.data.spec import Dataset, source_label

IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

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


def find_idx(data_dir: str, stem: str) -> str | None:
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
        found = [find_idx(data_dir, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
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
