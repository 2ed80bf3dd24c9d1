"""Do conditional samples show the class asked for? (issue 25, quality.)

    python benchmarks/conditional_accuracy.py RUN [--per-class 100] [--guidance 0 1 3] [--steps 50] [--json PATH]

For a run trained with ``--conditional``: ``--per-class`` samples of each class
(seed 0, EMA weights where the run kept them, on the CPU) classified by the
data set's judge (:func:`pyrovae.evaluate.judge_for`: trained on the real
training split, or read from its cache), and the share put in the class asked
for, beside the judge's own test accuracy. The chain and VDM are sampled at each
classifier-free guidance weight w of ``--guidance`` (the chain respaced to
``--steps`` ancestral steps, VDM on a grid of ``--steps``); w = 0 is the
model's p(x | y), w > 0 is not. The VAEs have no guidance: one row.
"""

from __future__ import annotations

import argparse
import json

import pyro
import torch

from pyrovae import data as datasets
from pyrovae.checkpoint import load, load_checkpoint
from pyrovae.evaluate import judge_for
from pyrovae.recipes.conditional import sample_images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 3.0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model, cfg = load(args.run, device="cpu")
    if not getattr(cfg, "conditional", False):
        raise SystemExit(f"{args.run} was not trained with --conditional")
    spec = datasets.run_spec(load_checkpoint(args.run), cfg)
    judge = judge_for(cfg.data)
    k = len(spec.classes)
    y = torch.arange(k).repeat_interleave(args.per_class)
    weights = args.guidance if cfg.model in ("diffusion", "vdm") else [None]
    rows = []
    for w in weights:
        pyro.set_rng_seed(0)
        with torch.no_grad():
            images = torch.cat([sample_images(cfg, model, part, args.steps, w) for part in y.split(250)])
        row = {"guidance": w, "accuracy": judge.accuracy(images, y), "judge_test_accuracy": judge.test_accuracy}
        rows.append(row)
        print(json.dumps({"run": args.run, "model": cfg.model, "samples": len(y), **row}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
