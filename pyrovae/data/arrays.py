"""Image arrays: a ``.npy`` (memory-mapped, read lazily when large) or a
``.npz`` (with optional labels and its own test split)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from pyrovae.data.spec import DEFAULT_TEST_FRACTION, Dataset, source_label, split_rows

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "NHW", "NHWC", "NCHW")
_CHANNEL_LIKE = 4  # an axis of at most this size may be the channel axis


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
        f"cannot tell the channel axis of an array of shape {tuple(shape)} "
        f"(neither axis 1 nor axis 3 is <= {_CHANNEL_LIKE}); pass --layout NHWC or NCHW"
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
            f"{what}: float values must be in [0, 1], found [{lo:.6g}, {hi:.6g}] "
            "(uint8 data in 0..255 is scaled by 1/255)"
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
    return split_rows(
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
        return split_rows(
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
