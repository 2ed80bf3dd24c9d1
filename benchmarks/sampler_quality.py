"""Sample quality against sampling steps for trained chain and VDM runs (issue 26 item 4).

    python benchmarks/sampler_quality.py --diffusion RUN --vdm RUN [--samples 500] \
        [--steps 10 20 50] [--ancestral-steps 50 1000] [--samplers ddim dpm-solver++] [--eta 0] [--json PATH]

For each run and each (sampler, steps): ``--samples`` draws (seed 0, EMA
weights, on the CPU) scored against the run's data set's test split in the
judge's features (:mod:`pyrovae.evaluate`; the judge trained on the training
split, or read from its cache): FD in the judge's features, KID, and seconds
per 1,000 samples. The chain clamps x0 estimates to [-1, 1] as its own
sampler does; VDM's samplers do not. Ancestral sampling uses each model's own
``sample`` (``--ancestral-steps``; the chain's respaced chain, VDM's grid).
The ELBO against the ODE's bits/dim is ``pyrovae evaluate MODEL RUN --likelihood ode``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pyrovae import data as datasets
from pyrovae.checkpoint import load
from pyrovae.diffusion.samplers import sample
from pyrovae.evaluate import frechet_distance, judge_for, kernel_distance
from pyrovae.recipes.diffusion import from_chain_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--diffusion", help="a pyrovae train diffusion run")
    parser.add_argument("--vdm", help="a pyrovae train vdm run")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--ancestral-steps", type=int, nargs="*", default=[50])
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM's eta")
    parser.add_argument("--samplers", nargs="+", default=["ddim", "dpm-solver++"])
    parser.add_argument("--chunk", type=int, default=250)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for name, run in (("diffusion", args.diffusion), ("vdm", args.vdm)):
        if run is None:
            continue
        model, cfg = load(run, model=name)
        ds = datasets.load_from_config(cfg)
        judge = judge_for(ds)
        reference = judge.embed(torch.as_tensor(ds.x_test[:]).float())
        clip = name == "diffusion"
        plan = [("ancestral", k) for k in args.ancestral_steps] + [(s, k) for s in args.samplers for k in args.steps]
        for sampler, steps in plan:
            start = time.perf_counter()
            with torch.no_grad():
                x = torch.cat(
                    [
                        sample(
                            model,
                            min(args.chunk, args.samples - i),
                            steps,
                            sampler,
                            eta=args.eta if sampler == "ddim" else 0.0,
                            clip_x0=clip,
                            seed=i,
                        )
                        for i in range(0, args.samples, args.chunk)
                    ]
                )
            seconds = time.perf_counter() - start
            features = judge.embed(from_chain_space(x).float())
            kid = kernel_distance(features, reference)
            row = {
                "model": name,
                "sampler": sampler,
                "steps": steps,
                **({"eta": args.eta} if sampler == "ddim" else {}),
                "samples": args.samples,
                "fd_judge": frechet_distance(features, reference),
                "kid_judge": kid["kid"],
                "kid_judge_std": kid["kid_std"],
                "seconds_per_1000": 1000 * seconds / args.samples,
                "judge_test_accuracy": judge.test_accuracy,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
