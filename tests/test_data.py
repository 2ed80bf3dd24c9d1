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


# ---- sources through the command line ------------------------------------

from pyrovae.cli import main  # noqa: E402

TINY_VAE = ["--z-dim", "2", "--hidden", "8", "--epochs", "1", "--batch-size", "8", "--test-particles", "1", "--quiet"]


def write_pngs(folder, n, shape=(6, 6, 3), seed=0):
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(os.path.join(folder, f"{i:02d}.png"))


def mixed_sizes(p):
    write_pngs(p / "src", 2)
    write_pngs(p / "src" / ".." / "src", 1, shape=(7, 6, 3), seed=1)
    os.replace(p / "src" / "00.png", p / "src" / "big.png")


CLI_BAD_SOURCES = [
    ("empty folder", lambda p: (p / "src").mkdir(), "src", "no image files"),
    (
        "corrupt image",
        lambda p: (write_pngs(p / "src", 2), (p / "src" / "x.png").write_bytes(b"garbage")),
        "src",
        "x.png: cannot read image",
    ),
    ("mixed sizes", mixed_sizes, "src", "differ in size"),
    (
        "float outside [0, 1]",
        lambda p: np.save(p / "src.npy", np.linspace(-1, 2, 48, dtype=np.float32).reshape(3, 4, 4)),
        "src.npy",
        r"found \[-1, 2\]",
    ),
    ("NaN", lambda p: np.save(p / "src.npy", np.full((3, 4, 4), np.nan, np.float32)), "src.npy", "NaN"),
    ("1-D array", lambda p: np.save(p / "src.npy", np.zeros(5, np.uint8)), "src.npy", r"got shape \(5,\)"),
    ("unknown name", lambda p: None, "cifar10", "not one of mnist5k"),
]


@pytest.mark.parametrize("case,make,source,message", CLI_BAD_SOURCES, ids=[c[0] for c in CLI_BAD_SOURCES])
def test_bad_source_is_one_line_exit_1_and_no_run_folder(tmp_path, monkeypatch, capsys, case, make, source, message):
    import re

    monkeypatch.chdir(tmp_path)
    make(tmp_path)
    out = tmp_path / "run"
    assert main(["train", "vae", "--data", source, "--out", str(out), *TINY_VAE]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pyrovae: error:") and re.search(message, err), err
    assert not out.exists()


def test_run_trained_on_a_folder_samples_without_it_and_evaluates_on_a_copy(tmp_path, capsys):
    import json
    import shutil

    import pyrovae

    write_pngs(tmp_path / "imgs", 20)
    run = str(tmp_path / "run")
    assert (
        main(
            [
                "train",
                "vae",
                "--data",
                str(tmp_path / "imgs"),
                "--net",
                "conv",
                "--likelihood",
                "discretised-logistic",
                "--out",
                run,
                *TINY_VAE,
            ]
        )
        == 0
    )
    shutil.copytree(tmp_path / "imgs", tmp_path / "copy")
    shutil.rmtree(tmp_path / "imgs")
    model, cfg = pyrovae.load(run)
    assert model.sample(2).shape == (2, 3 * 6 * 6)
    assert main(["sample", "vae", run, "--n", "4", "--device", "cpu"]) == 0
    assert os.path.exists(os.path.join(run, "samples-0.png"))
    with pytest.raises(FileNotFoundError):
        data.load_from_config(cfg)  # the data really is gone
    capsys.readouterr()
    assert main(["evaluate", "vae", run, "--data", str(tmp_path / "copy"), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["test_size"] == 2 and np.isfinite(result["test_elbo"])
    write_pngs(tmp_path / "grey", 4, shape=(6, 6))
    assert main(["evaluate", "vae", run, "--data", str(tmp_path / "grey"), "--device", "cpu"]) == 1
    assert "shape (1, 6, 6)" in capsys.readouterr().err


def test_checkpoint_without_a_data_spec_still_loads(tmp_path):
    import pyrovae
    from pyrovae import checkpoint

    run = str(tmp_path / "run")
    assert (
        main(["train", "vae", "--data", "digits", "--train-size", "16", "--test-size", "8", "--out", run, *TINY_VAE])
        == 0
    )
    ckpt = torch.load(os.path.join(run, checkpoint.CHECKPOINT), weights_only=True)
    assert ckpt["data"] == {"name": "digits", "image_shape": [1, 8, 8], "values": "unit"}
    del ckpt["data"]  # as written before the spec was saved
    torch.save(ckpt, os.path.join(run, checkpoint.CHECKPOINT))
    model, _ = pyrovae.load(run)
    assert model.sample(3).shape == (3, 64)


def test_lazy_rows_train_exactly_as_the_whole_tensor(tmp_path, monkeypatch):
    """The same batches from a memory-mapped .npy read by a worker process as
    from one tensor: the same weights after an epoch."""
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (40, 4, 4), dtype=np.uint8))
    states = []
    for lazy_bytes, workers in ((data.EAGER_BYTES, "0"), (0, "1")):
        monkeypatch.setattr(data.spec, "EAGER_BYTES", lazy_bytes)  # read where the split is made
        run = str(tmp_path / f"run{workers}")
        assert (
            main(["train", "vae", "--data", str(tmp_path / "x.npy"), "--num-workers", workers, "--out", run, *TINY_VAE])
            == 0
        )
        states.append(torch.load(os.path.join(run, "model.pt"), weights_only=True))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# ---- colour --------------------------------------------------------------


def assert_colour_png(path):
    from PIL import Image

    img = Image.open(path)
    assert img.mode == "RGB"
    a = np.asarray(img).astype(int)
    assert (np.abs(a[..., 0] - a[..., 1]) > 30).mean() > 0.01  # real colour, not grey in RGB


LATENT_COLOUR_ARGS = {
    "vae": ["--net", "conv", *TINY_VAE],
    "hvae": [
        "--z-dims",
        "3",
        "2",
        "--hidden",
        "8",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--test-particles",
        "1",
        "--quiet",
    ],
}


@pytest.mark.parametrize("model", sorted(LATENT_COLOUR_ARGS))
def test_latent_variable_models_train_on_photo_patches_and_draw_colour(tmp_path, model):
    import csv
    import math

    run = str(tmp_path / "run")
    args = [
        "--data",
        "photo-patches",
        "--train-size",
        "64",
        "--test-size",
        "16",
        "--likelihood",
        "discretised-logistic",
        "--iwae-k",
        "2",
    ]
    assert main(["train", model, *args, "--out", run, *LATENT_COLOUR_ARGS[model]]) == 0
    assert_colour_png(os.path.join(run, "reconstructions.png"))
    with open(os.path.join(run, "metrics.csv")) as f:
        row = next(csv.DictReader(f))
    # bits/dim count all 3 x 32 x 32 dimensions
    assert float(row["test_iwae_bpd"]) == pytest.approx(-float(row["test_iwae"]) / (3 * 32 * 32 * math.log(2)))


DIFFUSION_COLOUR_ARGS = {"diffusion": ["--T", "10"], "vdm": ["--time", "continuous"]}


@pytest.mark.parametrize("model", sorted(DIFFUSION_COLOUR_ARGS))
def test_diffusion_models_train_on_photo_patches_and_draw_colour(tmp_path, model):
    import csv
    import math

    run = str(tmp_path / "run")
    args = [
        "--data",
        "photo-patches",
        "--train-size",
        "32",
        "--test-size",
        "8",
        "--channels",
        "4",
        "--sample-steps",
        "3",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--quiet",
    ]
    assert main(["train", model, *args, *DIFFUSION_COLOUR_ARGS[model], "--out", run]) == 0
    assert_colour_png(os.path.join(run, "samples.png"))
    with open(os.path.join(run, "metrics.csv")) as f:
        row = next(csv.DictReader(f))
    assert float(row["test_bpd"]) == pytest.approx(-float(row["test_elbo"]) / (3 * 32 * 32 * math.log(2)))


def test_image_grid_draws_rgb_grey_and_other_channel_counts():
    from pyrovae import plots

    x = torch.rand(5, 3 * 4 * 2)
    rgb = plots.image_grid(x, (3, 4, 2), ncol=5)
    assert rgb.shape == (1 * 5 + 1, 5 * 3 + 1, 3)
    assert torch.equal(rgb[1:5, 1:3], x[0].reshape(3, 4, 2).permute(1, 2, 0))
    assert plots.image_grid(x[:, :8], (1, 4, 2), ncol=5).shape == (6, 16)
    panels = plots.image_grid(x[:, :16], (2, 4, 2), ncol=5)  # two grey panels per image
    assert panels.shape == (6, 5 * 5 + 1) and torch.equal(panels[1:5, 3:5], x[0, :16].reshape(2, 4, 2)[1])


def test_model_files_check_their_inputs_without_importing_the_data_package():
    """check_finite lives in pyrovae.checks, at the bottom: a model file does not pull in every data loader."""
    import subprocess
    import sys

    code = (
        "import sys, pyrovae.vae, pyrovae.hvae, pyrovae.diffusion.chain, pyrovae.diffusion.vdm; "
        "sys.exit(sorted(m for m in sys.modules if m.startswith('pyrovae.data')) or 0)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
