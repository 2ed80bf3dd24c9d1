"""Quality floor for `pyrovae train vae`: its test ELBO vs a VAE written in the
style of Pyro's examples/vae (exp-scale encoder, sigmoid-probs decoder, plain
SVI loop with Trace_ELBO), same architecture sizes, epochs, batches, optimiser,
data and fixed test binarisation; paired over seeds.

    python benchmarks/vae_quality_floor.py --epochs 100 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch import nn

from pyrovae import data
from pyrovae.train import TrainConfig, train


class ExampleStyleVAE(nn.Module):
    """z ~ N(0, I); x ~ Bernoulli(sigmoid(W2 softplus(W1 z))); q = N(mu(x), exp(s(x)))."""

    def __init__(self, x_dim=784, z_dim=50, hidden=400):
        super().__init__()
        self.enc = nn.Linear(x_dim, hidden)
        self.enc_loc, self.enc_log_scale = nn.Linear(hidden, z_dim), nn.Linear(hidden, z_dim)
        self.dec = nn.Sequential(nn.Linear(z_dim, hidden), nn.Softplus(), nn.Linear(hidden, x_dim), nn.Sigmoid())
        self.z_dim = z_dim

    def model(self, x):
        pyro.module("example_vae", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(self.dec(z), validate_args=False).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("example_vae", self)
        h = nn.functional.softplus(self.enc(x))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.enc_loc(h), self.enc_log_scale(h).exp()).to_event(1))


def test_elbo(model, guide, x_test, particles=10):
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        return -sum(elbo.loss(model, guide, x_test[i : i + 500]) for i in range(0, len(x_test), 500)) / len(x_test)


def train_reference(seed, epochs, batch_size, lr, ds, x_test):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    vae = ExampleStyleVAE()
    svi = SVI(vae.model, vae.guide, Adam({"lr": lr}), loss=Trace_ELBO())
    loader = data.make_loader(ds.x_train, batch_size=batch_size)
    for _ in range(epochs):
        for x, _ in loader:
            svi.step(data.binarize(x, "dynamic"))
    pyro.set_rng_seed(10_000 + seed)
    return test_elbo(vae.model, vae.guide, x_test)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg0 = TrainConfig(epochs=args.epochs)
    ds = data.load_mnist5k()
    x_test = data.binarize_test(ds.x_test, "dynamic")
    rows = []
    for seed in args.seeds:
        result = train(TrainConfig(epochs=args.epochs, seed=seed, quiet=True, out=f"runs/quality-floor-seed{seed}"))
        pyro.set_rng_seed(10_000 + seed)
        ours = test_elbo(result.model.model, result.model.guide, x_test)
        ref = train_reference(seed, args.epochs, cfg0.batch_size, cfg0.lr, ds, x_test)
        rows.append({"seed": seed, "pyrovae": ours, "pyro_example_style": ref, "difference": ours - ref})
        print(json.dumps(rows[-1]))
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("pyrovae", "pyro_example_style", "difference")}
    print(
        f"mean test ELBO over seeds {args.seeds}: pyrovae {mean['pyrovae']:.2f}, Pyro-example style "
        f"{mean['pyro_example_style']:.2f}, paired difference {mean['difference']:+.2f} nats/image"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"epochs": args.epochs, "rows": rows, "mean": mean}, f, indent=2)


if __name__ == "__main__":
    main()
