"""The quality target: train for a fixed wall-clock budget on MNIST-5k, then the
full-T bound in bits/dim on the first 100 test images.

    nice -n 10 python benchmarks/diffusion_quality.py --minutes 10 --out runs/diffusion-quality

Training is the library's own: SVI(chain.model, chain.guide_posterior, Adam,
DiffusionELBO(...)); the weights evaluated are an exponential moving average
of the trained ones (decay --ema), as in the reference DDPM. The run folder
has config.json + model.pt (the EMA weights) and the bound it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from pyrovae import data as datasets
from pyrovae.recipes.diffusion import DiffusionRecipe, write_samples
from pyrovae.train import TrainConfig


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--out", default="runs/diffusion-quality")
    p.add_argument("--T", type=int, default=1000)
    p.add_argument("--schedule", default="linear")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--objective", default="hybrid")
    p.add_argument("--variance", default="learned")
    p.add_argument("--time-sampler", default="uniform")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--n-test", type=int, default=100)
    args = p.parse_args()
    cfg = TrainConfig(
        model="diffusion",
        data="mnist5k",
        T=args.T,
        schedule=args.schedule,
        channels=args.channels,
        objective=args.objective,
        variance=args.variance,
        time_sampler=args.time_sampler,
        batch_size=args.batch_size,
        lr=args.lr,
        out=args.out,
        device="cpu",
    ).check()
    recipe = DiffusionRecipe()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "config.json"), "w") as f:
        f.write(cfg.to_json())
    pyro.set_rng_seed(0)
    pyro.enable_validation(False)
    ds = datasets.load_dataset("mnist5k")
    chain = recipe.build(cfg, ds)
    ema = copy.deepcopy(chain).requires_grad_(False)
    svi = SVI(chain.model, chain.guide, Adam({"lr": args.lr}), recipe.objective(cfg))
    loader = datasets.make_loader(ds.x_train, ds.y_train, args.batch_size)
    start, steps, done = time.perf_counter(), 0, False
    while not done:
        for xb, _ in loader:
            loss = svi.step(recipe.prepare_batch(cfg, xb))
            steps += 1
            with torch.no_grad():
                for pe, pt in zip(ema.parameters(), chain.parameters()):
                    pe.lerp_(pt, 1 - args.ema)
            if steps % 100 == 0:
                print(
                    f"step {steps}  loss/example {loss / len(xb):.4f}  {time.perf_counter() - start:.0f}s", flush=True
                )
            if time.perf_counter() - start > 60 * args.minutes:
                done = True
                break
    train_s = time.perf_counter() - start
    torch.save(ema.state_dict(), os.path.join(args.out, "model.pt"))
    x0 = recipe.prepare_test(cfg, ds.x_test[: args.n_test])
    t0 = time.perf_counter()
    with torch.no_grad():
        bound = ema.full_bound(x0)
    result = {
        "steps": steps,
        "train_seconds": train_s,
        "eval_seconds": time.perf_counter() - t0,
        "bits_per_dim": bound["bits_per_dim"].mean().item(),
        "prior_bpd": (bound["prior"].mean() / (784 * 0.6931471805599453)).item(),
        "decoder_bpd": (bound["terms"][:, 0].mean() / (784 * 0.6931471805599453)).item(),
        "args": vars(args),
    }
    print(json.dumps(result, indent=2))
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_samples(os.path.join(args.out, "samples.png"), ema, ds, 50, x0)


if __name__ == "__main__":
    main()
