"""Data: the named sets that ship with installed packages, and your own data
from a path (``--data PATH``). Nothing is ever downloaded.

Every source gives a :class:`Dataset`: rows ``x`` of shape ``(N, D)`` (flat
float32, pixel values in ``[0, 1]``, or real values for the 2-D toys),
integer labels ``y`` of shape ``(N,)``, and the shape of one example
(``image_shape``, ``(C, H, W)`` for images, ``(D,)`` otherwise) so that
convolutional networks can view ``x`` as images. Its :class:`DataSpec`
(name, shape, value convention) is what a model needs to be rebuilt; runs
save it, so a run loads without its data.

Names (:data:`DATASETS`): the named sets of :mod:`pyrovae.data.named`.

Paths (rules in docs/data.md): a folder of images (optionally in class
sub-folders), a ``.npy`` or ``.npz`` array, or a folder of the four IDX files.
A registered name is a name; anything else is a path. Path sources are
split into train/test by a seeded (stratified, when there are labels) split
of ``test_fraction`` of the examples, files sorted by path first, unless the
source has its own split. Sources whose decoded float32 training rows
exceed :data:`EAGER_BYTES` stay on disk: a ``.npy`` is memory-mapped and an
image folder decoded batch by batch (:class:`LazyRows`), read through a
``DataLoader`` with ``num_workers``.

The package has one concept per module: :mod:`~pyrovae.data.spec` (the types
and the seeded splits), :mod:`~pyrovae.data.named` (the named sets),
:mod:`~pyrovae.data.idx`, :mod:`~pyrovae.data.arrays` and
:mod:`~pyrovae.data.images` (the three kinds of path),
:mod:`~pyrovae.data.sources` (any source, by name or path),
:mod:`~pyrovae.data.transforms` (binarisation) and :mod:`~pyrovae.data.loader`
(batches). Every public name is importable from ``pyrovae.data`` itself.
"""

from pyrovae.checks import check_finite
from pyrovae.data.arrays import LAYOUTS, array_layout, check_values, load_npy, load_npz
from pyrovae.data.idx import IDX_STEMS, load_idx_folder, read_idx
from pyrovae.data.images import IMAGE_EXTENSIONS, decode_image, image_files, load_image_folder
from pyrovae.data.loader import example_dataset, make_loader
from pyrovae.data.named import (
    DATASETS,
    FASHION_MNIST_DIR,
    NAMED_LOADERS,
    TOY_DATASETS,
    load_digits,
    load_fashion_mnist,
    load_mnist5k,
    load_moons,
    load_photo_patches,
    make_moons,
    photo_patches,
    sample_photo_paths,
)
from pyrovae.data.sources import check_source, load_dataset, load_from_config, run_spec
from pyrovae.data.spec import (
    DEFAULT_TEST_FRACTION,
    EAGER_BYTES,
    VALUES,
    Dataset,
    DataSpec,
    LazyRows,
    source_label,
    stratified_split,
)
from pyrovae.data.transforms import BINARIZE, binarize, binarize_test

__all__ = [
    "BINARIZE",
    "DATASETS",
    "DEFAULT_TEST_FRACTION",
    "EAGER_BYTES",
    "FASHION_MNIST_DIR",
    "IDX_STEMS",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "NAMED_LOADERS",
    "TOY_DATASETS",
    "VALUES",
    "DataSpec",
    "Dataset",
    "LazyRows",
    "array_layout",
    "binarize",
    "binarize_test",
    "check_finite",
    "check_source",
    "check_values",
    "decode_image",
    "example_dataset",
    "image_files",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_from_config",
    "load_idx_folder",
    "load_image_folder",
    "load_mnist5k",
    "load_moons",
    "load_npy",
    "load_npz",
    "load_photo_patches",
    "make_loader",
    "make_moons",
    "photo_patches",
    "read_idx",
    "run_spec",
    "sample_photo_paths",
    "source_label",
    "stratified_split",
]
