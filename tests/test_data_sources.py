"""``--data PATH`` sources: image folders, .npy/.npz arrays, IDX folders; their
rules (docs/data.md) and their errors."""

import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import write_idx

from pyrovae import data


def write_images(folder, images, mode=None, names=None):
    """Save uint8 arrays (H, W) or (H, W, 3) as PNGs named 000.png, ... (or ``names``)."""
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(images):
        img = Image.fromarray(a)
        img = img.convert(mode) if mode else img
        img.save(os.path.join(folder, names[i] if names else f"{i:03d}.png"))


def rgb_images(n, h=6, w=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def all_rows(ds):
    return torch.cat([ds.x_train, ds.x_test]), torch.cat([ds.y_train, ds.y_test])


def sorted_rows(x):
    return sorted(map(tuple, (x * 255).round().to(torch.uint8).tolist()))


def chw_rows(a):
    """uint8 (N, C, H, W) -> the flat rows in [0, 1] the loaders give."""
    return torch.from_numpy(a.reshape(len(a), -1).astype(np.float32) / 255)


# ---- image folders -------------------------------------------------------


def test_rgb_folder_round_trips_pixels_with_a_seeded_split(tmp_path):
    images = rgb_images(20)
    write_images(tmp_path / "imgs", images)
    ds = data.load_dataset(str(tmp_path / "imgs"), test_fraction=0.25)
    assert ds.image_shape == (3, 6, 5) and ds.name == "imgs" and ds.values == "unit"
    assert len(ds.x_train) == 15 and len(ds.x_test) == 5
    x, y = all_rows(ds)
    assert sorted_rows(x) == sorted_rows(chw_rows(images.transpose(0, 3, 1, 2)))
    assert y.tolist() == [0] * 20
    again = data.load_dataset(str(tmp_path / "imgs"), test_fraction=0.25)
    assert torch.equal(again.x_test, ds.x_test)


def test_greyscale_folder_has_one_channel(tmp_path):
    images = rgb_images(4)[..., 0]
    write_images(tmp_path / "g", images)
    ds = data.load_dataset(str(tmp_path / "g"))
    assert ds.image_shape == (1, 6, 5)
    assert sorted_rows(all_rows(ds)[0]) == sorted_rows(chw_rows(images[:, None]))


def test_class_folders_give_labels_in_sorted_order_and_a_stratified_split(tmp_path):
    for k, cls in enumerate(["cat", "dog"]):
        write_images(tmp_path / "pets" / cls, rgb_images(10, seed=k))
    (tmp_path / "pets" / "dog" / "notes.txt").write_text("not an image: skipped")
    ds = data.load_dataset(str(tmp_path / "pets"), test_fraction=0.2)
    assert torch.bincount(ds.y_test).tolist() == [2, 2] and torch.bincount(ds.y_train).tolist() == [8, 8]
    x, y = all_rows(ds)
    dogs = chw_rows(rgb_images(10, seed=1).transpose(0, 3, 1, 2))
    assert sorted_rows(x[y == 1]) == sorted_rows(dogs)


def test_palette_rgba_and_mixed_grey_folders_are_read_as_rgb(tmp_path, caplog):
    base = rgb_images(3)
    folder = tmp_path / "mixed"
    write_images(folder, base[:1], mode="P", names=["a.png"])
    write_images(folder, base[1:2], mode="RGBA", names=["b.png"])
    write_images(folder, base[2:, ..., 0], names=["c.png"])
    with caplog.at_level(logging.WARNING, logger="pyrovae.data"):
        ds = data.load_dataset(str(folder), test_fraction=0.34)
    assert ds.image_shape == (3, 6, 5)
    assert "1 greyscale images among 2 colour" in caplog.text
    x = all_rows(ds)[0].reshape(-1, 3, 6, 5)
    grey = [img for img in x if torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])]
    assert len(grey) == 1 and torch.equal((grey[0][0] * 255).round().to(torch.uint8), torch.from_numpy(base[2, ..., 0]))


def test_mixed_sizes_need_image_size_and_are_then_resized(tmp_path):
    write_images(tmp_path / "m", [rgb_images(1)[0], rgb_images(1, h=9, w=7)[0]])
    with pytest.raises(ValueError, match="differ in size.*--image-size"):
        data.load_dataset(str(tmp_path / "m"))
    ds = data.load_dataset(str(tmp_path / "m"), image_size=4)
    assert ds.image_shape == (3, 4, 4) and ds.x_train.shape == (1, 48)


def test_lazy_folder_decodes_the_same_rows_as_an_eager_one(tmp_path):
    write_images(tmp_path / "imgs", rgb_images(10))
    eager = data.load_dataset(str(tmp_path / "imgs"))
    lazy = data.load_image_folder(str(tmp_path / "imgs"), lazy=True)
    assert isinstance(lazy.x_train, data.LazyRows) and lazy.x_train.shape == eager.x_train.shape
    assert torch.equal(lazy.x_train[[3, 0, 5]], eager.x_train[[3, 0, 5]])
    assert torch.equal(lazy.to("cpu").x_test, eager.x_test)
    assert torch.equal(lazy.subset(4).x_train[np.arange(4)], eager.x_train[:4])


# ---- arrays --------------------------------------------------------------

LAYOUT_CASES = [
    ("NHW", lambda a: a[:, 0]),
    ("NHWC", lambda a: a.transpose(0, 2, 3, 1)),
    ("NCHW", lambda a: a),
]


@pytest.mark.parametrize("layout,arrange", LAYOUT_CASES)
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_npy_round_trips_each_layout_and_dtype(tmp_path, layout, arrange, dtype):
    chw = np.random.default_rng(0).integers(0, 256, (10, 3, 8, 6), dtype=np.uint8)
    chw = chw[:, :1] if layout == "NHW" else chw
    a = arrange(chw)
    a = a if dtype == "uint8" else a.astype(np.float32) / 255
    np.save(tmp_path / "x.npy", a)
    ds = data.load_dataset(str(tmp_path / "x.npy"))
    assert ds.image_shape == chw.shape[1:] and ds.name == "x"
    assert len(ds.x_train) == 9 and len(ds.x_test) == 1
    assert sorted_rows(all_rows(ds)[0]) == sorted_rows(chw_rows(chw))


def test_ambiguous_array_is_read_channels_last_unless_layout_says(tmp_path, caplog):
    np.save(tmp_path / "a.npy", np.zeros((4, 3, 32, 3), dtype=np.uint8))
    with caplog.at_level(logging.WARNING, logger="pyrovae.data"):
        assert data.load_dataset(str(tmp_path / "a.npy")).image_shape == (3, 3, 32)
    assert "--layout NCHW" in caplog.text
    assert data.load_dataset(str(tmp_path / "a.npy"), layout="NCHW").image_shape == (3, 32, 3)


def test_lazy_npy_is_memory_mapped_and_reads_the_asked_rows(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", a)
    lazy = data.load_npy(str(tmp_path / "x.npy"), lazy=True)
    eager = data.load_npy(str(tmp_path / "x.npy"), lazy=False)
    assert torch.equal(lazy.x_train[[5, 1, 7]], eager.x_train[[5, 1, 7]])
    loader = data.make_loader(lazy.x_train, lazy.y_train, batch_size=8, shuffle=False, num_workers=2)
    assert torch.equal(torch.cat([xb for xb, _ in loader]), eager.x_train)


def test_npz_with_its_own_split_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    x, x_test = rng.random((6, 5, 5)).astype(np.float32), rng.random((2, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(6), x_test=x_test, y_test=np.array([7, 8]))
    ds = data.load_dataset(str(tmp_path / "d.npz"))
    assert ds.image_shape == (1, 5, 5)
    assert torch.equal(ds.x_train, torch.from_numpy(x.reshape(6, -1))) and torch.equal(
        ds.x_test, torch.from_numpy(x_test.reshape(2, -1))
    )
    assert ds.y_train.tolist() == list(range(6)) and ds.y_test.tolist() == [7, 8]


def test_npz_without_a_test_split_is_split_by_test_fraction(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 4, 4, 3), dtype=np.uint8))
    ds = data.load_dataset(str(tmp_path / "d.npz"), test_fraction=0.3)
    assert (len(ds.x_train), len(ds.x_test)) == (7, 3) and ds.image_shape == (3, 4, 4)


def test_idx_folder_uses_its_own_split(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 2)):
        write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte"), rng.integers(0, 256, (n, 7, 9)))
        write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte"), rng.integers(0, 10, n))
    ds = data.load_dataset(str(tmp_path))
    assert ds.image_shape == (1, 7, 9) and len(ds.x_train) == 5 and len(ds.x_test) == 2


# ---- names, specs and errors ---------------------------------------------


def test_photo_patches_are_rgb_and_split_by_region_without_overlap():
    ds = data.load_dataset("photo-patches")
    assert ds.image_shape == (3, 32, 32) and (len(ds.x_train), len(ds.x_test)) == (1550, 350)
    assert 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    assert torch.bincount(ds.y_test).tolist() == [175, 175]
    # Every test patch starts at or right of column 512, every training patch ends left of it.
    image = np.asarray(__import__("sklearn.datasets").datasets.load_sample_images().images[0])
    assert torch.equal(ds.x_test[0], chw_rows(image[None, 0:32, 512:544].transpose(0, 3, 1, 2))[0])
    assert torch.equal(ds.x_train[-1 - 775], chw_rows(image[None, 384:416, 480:512].transpose(0, 3, 1, 2))[0])


def test_data_spec_round_trips_and_checks_shapes():
    spec = data.load_dataset("digits").spec
    assert spec == data.DataSpec.from_dict(spec.to_dict()) and spec.x_dim == 64 and spec.channels == 1
    assert data.load_dataset("moons").spec.values == "real"
    with pytest.raises(ValueError, match=r"shape \(3, 8, 8\).*trained on \(1, 8, 8\)"):
        spec.check_matches(data.DataSpec("x", (3, 8, 8)), "--data x")


def corrupt_png(folder):
    write_images(folder, rgb_images(2))
    (folder / "bad.png").write_bytes(b"not a png at all")


def truncated_png(folder):
    write_images(folder, rgb_images(2, h=64, w=64))
    path = folder / "000.png"
    path.write_bytes(path.read_bytes()[:200])


BAD_SOURCES = [
    ("empty folder", lambda p: (p / "src").mkdir(), "src", ValueError, "no image files"),
    ("corrupt image", lambda p: corrupt_png(p / "src"), "src", ValueError, "bad.png: cannot read image"),
    ("truncated image", lambda p: truncated_png(p / "src"), "src", ValueError, "000.png: cannot decode image"),
    (
        "mixed sizes",
        lambda p: write_images(p / "src", [rgb_images(1)[0], rgb_images(1, h=7)[0]]),
        "src",
        ValueError,
        "--image-size",
    ),
    (
        "float outside [0, 1]",
        lambda p: np.save(p / "src.npy", np.full((3, 4, 4), 1.5, np.float32)),
        "src.npy",
        ValueError,
        r"\[0, 1\], found \[1.5, 1.5\]",
    ),
    (
        "NaN",
        lambda p: np.save(p / "src.npy", np.full((3, 4, 4), np.nan, np.float32)),
        "src.npy",
        ValueError,
        "48 NaN or inf",
    ),
    ("1-D array", lambda p: np.save(p / "src.npy", np.zeros(5, np.uint8)), "src.npy", ValueError, r"got shape \(5,\)"),
    (
        "int64 array",
        lambda p: np.save(p / "src.npy", np.ones((3, 4, 4), np.int64)),
        "src.npy",
        ValueError,
        "got int64 with values in",
    ),
    ("empty .npy file", lambda p: (p / "src.npy").write_bytes(b""), "src.npy", ValueError, "src.npy: cannot read .npy"),
    (
        "truncated .npy",
        lambda p: (p / "src.npy").write_bytes(
            b"\x93NUMPY\x01\x00v\x00{'descr': '|u1', 'fortran_order': False, 'shape': (9, 9, 9), }" + b" " * 40 + b"\n"
        ),
        "src.npy",
        ValueError,
        "src.npy: cannot read .npy",
    ),
    (
        "npz without x",
        lambda p: np.savez(p / "src.npz", images=np.zeros((3, 4, 4))),
        "src.npz",
        ValueError,
        "must hold 'x'",
    ),
    ("other file type", lambda p: (p / "src.csv").write_text("1,2"), "src.csv", ValueError, "not .npy or .npz"),
    ("missing path", lambda p: None, "no/such/dir", FileNotFoundError, "does not exist"),
    ("unknown bare name", lambda p: None, "cifar10", ValueError, "not one of mnist5k.*no such path exists"),
]


@pytest.mark.parametrize("case,make,source,error,message", BAD_SOURCES, ids=[c[0] for c in BAD_SOURCES])
def test_bad_sources_raise_one_clear_line(tmp_path, monkeypatch, case, make, source, error, message):
    monkeypatch.chdir(tmp_path)
    make(tmp_path)
    with pytest.raises(error, match=message) as info:
        data.load_dataset(source)
    assert "\n" not in str(info.value)


def test_options_that_do_not_apply_are_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="image_size does not apply"):
        data.load_dataset(str(tmp_path / "x.npy"), image_size=8)
    with pytest.raises(ValueError, match="layout NHWC needs a 4-D array"):
        data.load_dataset(str(tmp_path / "x.npy"), layout="NHWC")
