"""Peer for `pyrovae train vae --labelled N`: the semi-supervised VAE (M2) written
in the style of Pyro's examples/vae/ss_vae_M2.py (one-hot y, clipped softmax and
sigmoid outputs, exp-scale encoder, TraceEnum_ELBO with parallel enumeration, the
auxiliary loss as a second SVI sharing one pyro.optim.Adam, one labelled batch
interleaved among the unlabelled ones per epoch, the held-out accuracy choosing
the epoch), run on pyrovae's split for a seed: the same held-out examples, the
same labelled examples, the same dynamic binarisation of the training batches
and fixed binarisation of the held-out and test images.

    OMP_NUM_THREADS=1 python benchmarks/ssvae_peer.py --data mnist5k --labelled 100 --held-out 500 --epochs 30 --seed 0
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.optim import Adam
from torch import nn

from pyrovae import data
from pyrovae.recipes.ssvae import SSVAERecipe


def _cat(*parts):
    """Concatenate along the last dimension, broadcasting the rest (y enumerated as (K, 1, K))."""
    batch = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(*batch, p.shape[-1]) for p in parts], -1)


class ExampleStyleSSVAE(nn.Module):
    """The example's M2: p(z) = N(0, I), p(y) = OneHotCat(1/K), p(x|y,z) = Bernoulli(decoder(z, y));
    q(y|x) = OneHotCat(encoder_y(x)), q(z|x,y) = N(encoder_z(x, y)); softplus hidden layers."""

    def __init__(self, x_dim=784, classes=10, z_dim=50, hidden=500, aux_loss_multiplier=46.0, epsilon_scale=1e-7):
        super().__init__()
        self.z_dim, self.classes, self.aux, self.eps = z_dim, classes, aux_loss_multiplier, epsilon_scale
        self.encoder_y = nn.Sequential(nn.Linear(x_dim, hidden), nn.Softplus(), nn.Linear(hidden, classes))
        self.encoder_z = nn.Sequential(nn.Linear(x_dim + classes, hidden), nn.Softplus(), nn.Linear(hidden, 2 * z_dim))
        self.decoder = nn.Sequential(nn.Linear(z_dim + classes, hidden), nn.Softplus(), nn.Linear(hidden, x_dim))

    def _alpha(self, xs):
        # ClippedSoftmax: probabilities kept away from 0 and 1
        return self.encoder_y(xs).softmax(-1).clamp(self.eps, 1 - self.eps)

    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        with pyro.plate("data", xs.shape[0]):
            zs = pyro.sample("z", dist.Normal(xs.new_zeros(self.z_dim), 1.0).to_event(1))
            ys = pyro.sample("y", dist.OneHotCategorical(xs.new_ones(self.classes) / self.classes), obs=ys)
            loc = torch.sigmoid(self.decoder(_cat(zs, ys))).clamp(self.eps, 1 - self.eps)
            pyro.sample("x", dist.Bernoulli(loc, validate_args=False).to_event(1), obs=xs)

    def guide(self, xs, ys=None):
        with pyro.plate("data", xs.shape[0]):
            if ys is None:
                ys = pyro.sample("y", dist.OneHotCategorical(self._alpha(xs)))
            loc, log_scale = self.encoder_z(_cat(xs, ys)).split(self.z_dim, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    def model_classify(self, xs, ys=None):
        pyro.module("ss_vae", self)
        with pyro.plate("data", xs.shape[0]), pyro.poutine.scale(scale=self.aux):
            pyro.sample("y_aux", dist.OneHotCategorical(self._alpha(xs)), obs=ys)

    def guide_classify(self, xs, ys=None):
        pass

    @torch.no_grad()
    def accuracy(self, xs, ys):
        return (self._alpha(xs).argmax(-1) == ys).double().mean().item()


def split(name, labelled, held_out, seed, train_size=None, test_size=None, classes=10):
    """pyrovae's split for ``seed``: (x_train, y_train with -1 unlabelled, x_held_out, y_held_out, x_test, y_test),
    held-out and test binarised once as the trainer does."""
    ds = data.load_dataset(name).subset(train_size, test_size)
    ds, x_held, y_held = ds.hold_out(held_out, seed)
    cfg = SimpleNamespace(data=name, seed=seed, labelled=labelled, classes=classes)
    ds = SSVAERecipe().prepare_data(cfg, ds)
    return (
        ds.x_train,
        ds.y_train,
        data.binarize_test(x_held, "dynamic"),
        y_held,
        data.binarize_test(ds.x_test, "dynamic"),
        ds.y_test,
    )


def run(args, seed):
    x, y, x_held, y_held, x_test, y_test = split(
        args.data, args.labelled, args.held_out, seed, args.train_size, args.test_size
    )
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    ss_vae = ExampleStyleSSVAE(x.shape[1], hidden=args.hidden, z_dim=args.z_dim, aux_loss_multiplier=args.aux)
    optimizer = Adam({"lr": args.lr, "betas": (args.beta_1, 0.999)})
    guide = config_enumerate(ss_vae.guide, "parallel", expand=True)
    losses = [
        SVI(ss_vae.model, guide, optimizer, loss=TraceEnum_ELBO(max_plate_nesting=1)),
        SVI(ss_vae.model_classify, ss_vae.guide_classify, optimizer, loss=Trace_ELBO()),
    ]
    sup, unsup = (y >= 0).nonzero()[:, 0], (y < 0).nonzero()[:, 0]
    onehot = torch.eye(10)
    interval = int(len(x) / len(sup))
    train_seconds, rows = 0.0, []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        sup_batches = sup[torch.randperm(len(sup))].split(args.batch_size)
        unsup_batches = unsup[torch.randperm(len(unsup))].split(args.batch_size)
        s = u = 0
        for i in range(len(sup_batches) + len(unsup_batches)):
            if i % interval == 1 and s < len(sup_batches) or u == len(unsup_batches):
                idx, s = sup_batches[s], s + 1
                xs, ys = data.binarize(x[idx], "dynamic"), onehot[y[idx]]
                for svi in losses:
                    svi.step(xs, ys)
            else:
                idx, u = unsup_batches[u], u + 1
                losses[0].step(data.binarize(x[idx], "dynamic"))
        train_seconds += time.perf_counter() - start
        rows.append(
            {
                "epoch": epoch,
                "held_out_accuracy": ss_vae.accuracy(x_held, y_held),
                "test_accuracy": ss_vae.accuracy(x_test, y_test),
                "train_seconds": train_seconds,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    best = max(rows, key=lambda r: r["held_out_accuracy"])
    return {
        "seed": seed,
        "best_epoch": best["epoch"],
        "test_accuracy_best_held_out": best["test_accuracy"],
        "test_accuracy_last": rows[-1]["test_accuracy"],
        "train_seconds": train_seconds,
        "seconds_per_epoch": train_seconds / args.epochs,
        "epochs": rows,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--labelled", type=int, default=100)
    parser.add_argument("--held-out", type=int, default=500)
    parser.add_argument("--train-size", type=int, default=None, help="the first N training examples")
    parser.add_argument("--test-size", type=int, default=None, help="the first N test examples")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--hidden", type=int, default=500)
    parser.add_argument("--z-dim", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.00042)
    parser.add_argument("--beta-1", type=float, default=0.95)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--aux", type=float, default=46.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = [run(args, seed) for seed in args.seeds]
    for r in results:
        print(
            f"seed {r['seed']}: test accuracy {r['test_accuracy_best_held_out']:.3f} at the best held-out epoch "
            f"{r['best_epoch']}, {r['test_accuracy_last']:.3f} at the last; {r['seconds_per_epoch']:.2f} s/epoch"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
