"""Folders of image files (optionally in class sub-folders), decoded with Pillow."""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

from pyrovae.data.spec import DEFAULT_TEST_FRACTION, Dataset, source_label, split_rows

log = logging.getLogger(__name__)

# torchvision's ImageFolder list; other files in an image folder are skipped.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
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
            f"{folder}: holds both images ({os.path.basename(top[0])}, ...) and sub-folders ({classes[0]}, ...); "
            "put every image in a class folder, or none"
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
                    f"{path}: {img.mode} images (16-bit or float pixels) are not supported; "
                    "save them as 8-bit greyscale or RGB"
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
            f"{folder}: images differ in size ({p1} is {s1[0]}x{s1[1]}, {p2} is {s2[0]}x{s2[1]}); "
            "pass --image-size H to resize all to H x H"
        )
    else:
        size = next(iter(sizes))
    if classes:
        log.info("%s: %d images in %d classes (%s)", folder, len(files), len(classes), ", ".join(classes))
    ds = split_rows(
        source_label(folder),
        _ImageRows(files, channels, size),
        len(files),
        (channels, *size),
        labels,
        test_fraction,
        lazy,
    )
    return dataclasses.replace(ds, classes=tuple(classes))
