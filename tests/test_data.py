import gzip
import os
import struct

import numpy as np
import pytest
import torch

from pyrovae import data


@pytest.fixture(scope="module")
def mnist():
    return data.load_mnist5k()


def write_idx(path, array, type_code=0x08):
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(">u1" if type_code == 0x08 else ">i4").tobytes())


def test_mnist5k_split_sizes_shapes_and_range(mnist):
    assert mnist.x_train.shape == (4000, 784) and mnist.x_test.shape == (1000, 784)
    assert mnist.x_train.dtype == torch.float32
    assert mnist.x_train.min() == 0 and mnist.x_train.max() == 1
    assert mnist.image_shape == (1, 28, 28)


def test_mnist5k_split_is_stratified_and_disjoint(mnist):
    assert torch.bincount(mnist.y_test, minlength=10).tolist() == [100] * 10
    assert torch.bincount(mnist.y_train, minlength=10).tolist() == [400] * 10
    train_rows = {tuple(r) for r in (mnist.x_train * 255).round().to(torch.uint8).numpy()[:, ::7]}
    overlap = sum(tuple(r) in train_rows for r in (mnist.x_test * 255).round().to(torch.uint8).numpy()[:, ::7])
    assert overlap < 5  # the 5,000 digits hold a handful of near-duplicates, not a leaked split


def test_mnist5k_split_is_deterministic(mnist):
    again = data.load_mnist5k()
    assert torch.equal(again.x_test, mnist.x_test) and torch.equal(again.y_train, mnist.y_train)


def test_digits_are_8x8_in_unit_range():
    ds = data.load_digits()
    assert ds.image_shape == (1, 8, 8) and ds.x_train.shape[1] == 64
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert 0 <= ds.x_train.min() and ds.x_train.max() == 1


def test_moons_are_standardised_2d():
    ds = data.load_moons()
    assert ds.x_train.shape == (4000, 2) and ds.image_shape == (2,)
    assert torch.allclose(ds.x_train.mean(0), torch.zeros(2), atol=0.1)
    assert torch.allclose(ds.x_train.std(0), torch.ones(2), atol=0.15)


@pytest.mark.parametrize("name", ["img.idx", "img.idx.gz"])
def test_read_idx_round_trips_a_small_file(tmp_path, name):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = str(tmp_path / name)
    write_idx(path, array)
    np.testing.assert_array_equal(data.read_idx(path), array)


def test_read_idx_reads_int32_big_endian(tmp_path):
    array = np.array([1, -2, 70000], dtype=np.int32)
    path = str(tmp_path / "ints.idx")
    write_idx(path, array, type_code=0x0C)
    np.testing.assert_array_equal(data.read_idx(path), array)


def test_read_idx_rejects_bad_magic(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(str(path))


def test_read_idx_rejects_truncated_data(tmp_path):
    path = str(tmp_path / "short.idx")
    write_idx(path, np.zeros((4, 5), dtype=np.uint8))
    with open(path, "rb+") as f:
        f.truncate(os.path.getsize(path) - 3)
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(path)


def test_fashion_mnist_reader_on_small_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte.gz"), rng.integers(0, 256, (n, 28, 28)))
        write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte.gz"), rng.integers(0, 10, n))
    ds = data.load_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert ds.x_train.shape == (6, 784) and ds.x_test.shape == (3, 784)
    assert 0 <= ds.x_train.min() and ds.x_train.max() <= 1


def test_fashion_mnist_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(str(tmp_path))


@pytest.mark.skipif(
    not os.path.isdir(data.FASHION_MNIST_DIR),
    reason=f"Debian's dataset-fashion-mnist is not installed ({data.FASHION_MNIST_DIR} missing)",
)
def test_fashion_mnist_real_files():
    ds = data.load_fashion_mnist()
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="mnist5k"):
        data.load_dataset("cifar")


def test_binarize_modes():
    x = torch.tensor([[0.0, 0.2, 0.5, 0.7, 1.0]])
    assert data.binarize(x, "threshold").tolist() == [[0, 0, 0, 1, 1]]
    assert torch.equal(data.binarize(x, "none"), x)
    draws = data.binarize(x.expand(20000, 5), "dynamic")
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    se = (x * (1 - x) / 20000).sqrt()
    assert ((draws.mean(0) - x[0]).abs() <= 4 * se[0] + 1e-6).all()
    with pytest.raises(ValueError, match="dynamic"):
        data.binarize(x, "otsu")


def test_test_split_binarisation_is_fixed():
    x = torch.rand(50, 10)
    assert torch.equal(data.binarize_test(x, "dynamic"), data.binarize_test(x, "dynamic"))


def test_loader_visits_every_example_once_per_epoch():
    x = torch.arange(10.0)[:, None]
    loader = data.make_loader(x, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = [xb for xb, _ in loader]
    assert [len(b) for b in batches] == [4, 4, 2] and len(loader) == 3
    assert sorted(torch.cat(batches).flatten().tolist()) == list(range(10))


def test_loader_rejects_bad_batch_size_and_empty_data():
    with pytest.raises(ValueError, match="batch_size"):
        data.make_loader(torch.zeros(3, 2), batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        data.make_loader(torch.zeros(0, 2))
