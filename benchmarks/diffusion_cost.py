"""Step cost of the diffusion objectives on CPU (the figures in docs/diffusion.md).

    python benchmarks/diffusion_cost.py [--T 1000] [--batch 64] [--repeats 5]

Times, as medians over repeats, interleaved so that load from other processes
hits every variant alike:
- a plain PyTorch DDPM training step (random t, q_sample, eps MSE, Adam), no Pyro;
- our SVI step with DiffusionELBO (the unbiased bound, and L_simple);
- an SVI step with stock Trace_ELBO over the literal chain (one site per step);
- the full-T bound batched over t vs the floor: the denoiser's forward passes
  alone over the same T x B inputs; and Trace_ELBO's loss over the literal chain.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

from pyrovae import data as datasets
from pyrovae.diffusion.chain import DiffusionChain
from pyrovae.diffusion.denoisers import TimeMLP
from pyrovae.diffusion.schedule import NoiseSchedule
from pyrovae.infer.diffusion_elbo import DiffusionELBO
from pyrovae.infer.losses import SimpleLoss
from pyrovae.recipes.diffusion import to_chain_space


def timed(fn, repeats):
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--T", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner", type=int, default=20, help="training steps per timed repeat")
    p.add_argument(
        "--skip-literal", action="store_true", help="leave out the literal chain (minutes per step under load)"
    )
    args = p.parse_args()
    pyro.set_rng_seed(0)
    pyro.enable_validation(False)
    x = to_chain_space(datasets.load_mnist5k().x_train[: args.batch])
    chain = DiffusionChain(TimeMLP(784, (256, 256, 256)), NoiseSchedule.from_name("linear", args.T), 784, "discretised")
    s = chain.schedule

    opt = torch.optim.Adam(chain.net.parameters(), 1e-4)

    def plain_step():
        t = torch.randint(1, args.T + 1, (args.batch,))
        noise = torch.randn_like(x)
        x_t = (
            s.sqrt_alphas_cumprod[t - 1, None].float() * x
            + s.sqrt_one_minus_alphas_cumprod[t - 1, None].float() * noise
        )
        loss = ((chain.net(x_t, t.float() * 1000 / args.T) - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    svis = {
        name: SVI(
            chain.model, chain.guide_posterior, Adam({"lr": 1e-4}), loss=obj.loss, loss_and_grads=obj.loss_and_grads
        )
        for name, obj in (("DiffusionELBO (bound)", DiffusionELBO()), ("SimpleLoss (L_simple)", SimpleLoss()))
    }
    literal = SVI(chain.model, chain.guide_posterior, Adam({"lr": 1e-4}), Trace_ELBO())
    steps = {"plain PyTorch DDPM step": plain_step, **{k: (lambda v=v: v.step(x)) for k, v in svis.items()}}
    for fn in steps.values():  # warm up
        fn()
    results = {k: [] for k in steps}
    results["Trace_ELBO over the literal chain"] = []
    for _ in range(args.repeats):
        for name, fn in steps.items():
            results[name].append(timed(lambda fn=fn: [fn() for _ in range(args.inner)], 1)[0] / args.inner)
        if not args.skip_literal:
            results["Trace_ELBO over the literal chain"].append(timed(lambda: literal.step(x), 1)[0])
    base = statistics.median(results["plain PyTorch DDPM step"])
    print(f"training step, T={args.T}, batch {args.batch}, TimeMLP 784-256x3 (median of {args.repeats}):")
    for name, v in results.items():
        if v:
            m = statistics.median(v)
            print(f"  {name:36s} {m * 1e3:10.2f} ms   {m / base:8.2f} x plain")

    # evaluation: the full bound vs the floor of T x B denoiser forwards
    chunk = 512
    per_call = max(1, chunk // args.batch)
    inputs = [
        (
            x.expand(min(per_call, args.T - a), *x.shape).reshape(-1, 784),
            torch.rand(min(per_call, args.T - a) * args.batch) * 1000,
        )
        for a in range(0, args.T, per_call)
    ]
    trace = Trace_ELBO()

    def floor():
        for xi, ti in inputs:
            chain.net(xi, ti)

    evals = {
        "denoiser forwards alone (floor)": floor,
        "full bound batched over t": lambda: chain.full_bound(x, chunk),
    }
    if not args.skip_literal:
        evals["Trace_ELBO loss, literal chain"] = lambda: trace.loss(chain.model, chain.guide_posterior, x)
    res = {k: [] for k in evals}
    with torch.no_grad():
        for _ in range(args.repeats):
            for k, fn in evals.items():
                res[k].append(timed(fn, 1)[0])
    base = statistics.median(res["denoiser forwards alone (floor)"])
    print(f"full-T evaluation of one batch, T={args.T}, batch {args.batch}:")
    for name, v in res.items():
        m = statistics.median(v)
        print(f"  {name:36s} {m * 1e3:10.1f} ms   {m / base:8.2f} x floor")


if __name__ == "__main__":
    main()
