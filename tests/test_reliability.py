"""Issue 24, "nothing lost, nothing silent", second sweep: the twelve cases a
new user's first days found, then the ones found by looking further in the
same places (docs/reliability.md lists them all, with these tests' names).

Every run here is tiny (digits, a few dozen examples, one or two epochs)."""

import pickle

import numpy as np
import pyro
import pytest
import torch

from pyrovae.cli import main
from pyrovae.config import TrainConfig

TINY = ["--data", "digits", "--train-size", "48", "--test-size", "16", "--batch-size", "16", "--quiet"]
VAE_TINY = [*TINY, "--z-dim", "2", "--hidden", "8"]
SMALL = {
    "vae": ["--z-dim", "2", "--hidden", "8"],
    "hvae": ["--z-dims", "2", "2", "--hidden", "8", "--kl-warmup", "0"],
    "diffusion": [
        "--T",
        "4",
        "--channels",
        "4",
        "--objective",
        "elbo",
        "--variance",
        "beta_tilde",
        "--eval-every",
        "1",
    ],
    "vdm": ["--net", "mlp", "--hidden", "8", "--time", "4"],
}


def tiny(model="vae", **changes) -> TrainConfig:
    small = {
        "vae": dict(z_dim=2, hidden=[8]),
        "hvae": dict(z_dims=[2, 2], hidden=[8], kl_warmup=0),
        "diffusion": dict(T=4, channels=4, objective="elbo", variance="beta_tilde", eval_every=1),
        "vdm": dict(net="mlp", hidden=[8], time="4"),
    }[model]
    values = dict(model=model, data="digits", train_size=48, test_size=16, batch_size=16, epochs=1, quiet=True)
    return TrainConfig(**{**values, **small, **changes})


def digits_spec():
    from pyrovae.data import DataSpec

    return DataSpec("digits", (1, 8, 8))


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def trained(tmp_path, model="vae", name="run", epochs=1, extra=()):
    out = tmp_path / name
    assert main(["train", model, *TINY, *SMALL[model], "--epochs", str(epochs), "--out", str(out), *extra]) == 0
    return out


# --- 5. torch.save(model) after an SVI step ----------------------------------------------------------


def build(model):
    from pyrovae.config import MODELS

    cfg = tiny(model)
    return MODELS[model].recipe.build(cfg, digits_spec())


def one_svi_step(net, x):
    svi = pyro.infer.SVI(net.model, net.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    svi.step(x)


def model_input(model):
    x = torch.rand(4, 64)
    return x.bernoulli() if model in ("vae", "hvae") else (x * 255).round() / 127.5 - 1


@pytest.mark.parametrize("model", ["vae", "hvae", "diffusion", "vdm"])
def test_a_model_pickles_after_an_svi_step_with_equal_outputs(model, tmp_path):
    net = build(model)
    x = model_input(model)
    one_svi_step(net, x)
    torch.save(net, tmp_path / "m.pt")
    back = torch.load(tmp_path / "m.pt", weights_only=False)
    for a, b in zip(net.state_dict().values(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    pyro.set_rng_seed(1)
    expected = pyro.infer.Trace_ELBO().loss(net.model, net.guide, x)
    pyro.set_rng_seed(1)
    assert pyro.infer.Trace_ELBO().loss(back.model, back.guide, x) == pytest.approx(expected)
    one_svi_step(net, x)  # the live model trains on
    pickle.dumps(net)


# --- 6. VDM .double() with float32 data ---------------------------------------------------------------


def test_vdm_double_scores_float32_data_as_the_chain_does():
    vdm = build("vdm").double()
    x = model_input("vdm")
    loss = pyro.infer.Trace_ELBO().loss(vdm.model, vdm.guide, x)
    assert np.isfinite(loss)


# --- 10. a 1-D .npy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_an_array_of_the_wrong_rank_names_its_file(suffix, tmp_path):
    from pyrovae import data

    path = tmp_path / f"flat{suffix}"
    a = np.zeros(10, dtype=np.float32)
    np.save(path, a) if suffix == ".npy" else np.savez(path, x=a)
    with pytest.raises(ValueError, match="flat" + suffix.replace(".", r"\.")):
        data.load_dataset(str(path))
