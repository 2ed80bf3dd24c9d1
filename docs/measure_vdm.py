"""The measurements behind docs/vdm.md: VDM against the diffusion chain at an
equal CPU budget, the variance of the loss estimate per schedule, and the
bits/dim-against-time figure.

1. Seconds per epoch, both models side by side on one thread each (the
   machine is shared, so wall time is not idle time; the budget is converted
   to epochs):

       export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
       nice -n 10 python -m pyrovae train vdm --seed 0 --epochs 2 --out /tmp/vdmq/time-vdm --quiet &
       nice -n 10 python -m pyrovae train diffusion --seed 0 --epochs 2 --out /tmp/vdmq/time-diff --quiet &
       # metrics.csv "seconds" / 2 -> s/epoch; 600 s / (s/epoch) -> epochs

2. The two runs (by epochs, side by side, a test estimate every epoch), then
   the full bounds on the first 100 test images:

       nice -n 10 python -m pyrovae train vdm --seed 0 --epochs 28 --eval-every 1 --out /tmp/vdmq/vdm --quiet &
       nice -n 10 python -m pyrovae train diffusion --seed 0 --epochs 30 --eval-every 1 \\
           --out /tmp/vdmq/diffusion --quiet &
       nice -n 10 python -m pyrovae evaluate vdm /tmp/vdmq/vdm --n 100          # L_inf, 10 replicates x 10 draws
       nice -n 10 python -m pyrovae evaluate diffusion /tmp/vdmq/diffusion --n 100   # T = 1000 terms

3. The other schedules at the same 28 epochs, and the spread of the loss
   estimate on trained weights:

       nice -n 10 python -m pyrovae train vdm --schedule fixed --seed 0 --epochs 28 --eval-every 7 \\
           --out /tmp/vdmq/vdm-fixed --quiet &
       nice -n 10 python -m pyrovae train vdm --schedule learned-net --minimise-variance --seed 0 --epochs 28 \\
           --eval-every 7 --out /tmp/vdmq/vdm-minvar --quiet &
       nice -n 10 python docs/measure_vdm.py variance /tmp/vdmq/vdm-fixed /tmp/vdmq/vdm /tmp/vdmq/vdm-minvar

4. The figure:

       python docs/measure_vdm.py figure --vdm /tmp/vdmq/vdm --diffusion /tmp/vdmq/diffusion \\
           --out docs/figures/vdm-bpd-vs-time.png
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os

import torch


def spread(run: str, repeats: int, batch: int, seed: int) -> dict:
    """The standard deviation of the loss estimate on one fixed batch (the
    first ``batch`` training images) over ``repeats`` independent re-draws of
    (t, eps, z_0), with the run's EMA weights: the diffusion term and the total
    -ELBO, per example averaged over the batch, as the trainer sees them (one
    draw of t per example), with antithetic and with i.i.d. times."""
    import pyro

    from pyrovae import checkpoint
    from pyrovae import data as datasets
    from pyrovae.infer.vdm_elbo import VDMELBO
    from pyrovae.recipes.diffusion import to_chain_space

    vdm, cfg = checkpoint.load(run, model="vdm")
    x = to_chain_space(datasets.load_dataset(cfg.data).x_train[:batch])
    scale = 1.0 / (vdm.x_dim * math.log(2))  # nats per example -> bits/dim
    pyro.set_rng_seed(seed)
    out = {
        "run": run,
        "schedule": cfg.schedule,
        "minimise_variance": cfg.minimise_variance,
        "batch": batch,
        "repeats": repeats,
    }
    for antithetic in (True, False):
        elbo = VDMELBO(antithetic=antithetic)
        diff, total = [], []
        with torch.no_grad():
            for _ in range(repeats):
                terms = elbo.bound_terms(vdm, x)
                diff.append(terms.kl_layers.mean().item())
                total.append(terms.nats().mean().item())
        diff, total = torch.tensor(diff, dtype=torch.float64), torch.tensor(total, dtype=torch.float64)
        key = "antithetic" if antithetic else "iid"
        out[key] = {
            "diffusion_mean_bpd": diff.mean().item() * scale,
            "diffusion_sd_bpd": diff.std().item() * scale,
            "total_mean_bpd": total.mean().item() * scale,
            "total_sd_bpd": total.std().item() * scale,
            "diffusion_sd_nats": diff.std().item(),
            "total_sd_nats": total.std().item(),
        }
    with torch.no_grad():
        out["gamma_0"], out["gamma_1"] = vdm.gamma.gamma_min.item(), vdm.gamma.gamma_max.item()
    return out


def read_metrics(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.csv")) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def figure(vdm_run: str, diffusion_run: str, out: str, extra: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, label, color in (
        (vdm_run, "VDM (pyrovae train vdm, learned-linear, continuous)", "tab:blue"),
        (diffusion_run, "diffusion chain (pyrovae train diffusion, T = 1000)", "tab:orange"),
    ):
        rows = read_metrics(run)
        ax.plot(
            [r["seconds"] for r in rows],
            [r["test_bpd"] for r in rows],
            "o-",
            ms=3,
            color=color,
            label=label + ": per-epoch test estimate",
        )
        final = rows[-1]["seconds"]
        vdm_eval = os.path.join(run, "evaluate.json")
        chain_eval = sorted(glob.glob(os.path.join(run, "evaluate-*.json")))
        if run == vdm_run and os.path.exists(vdm_eval):
            e = json.load(open(vdm_eval))
            ax.errorbar(
                [final],
                [e["test_bpd"]],
                yerr=[2 * e["test_bpd_se"]],
                fmt="*",
                ms=12,
                color=color,
                label=f"VDM full bound, 100 test images: {e['test_bpd']:.3f} +- {e['test_bpd_se']:.3f}",
            )
        elif run == diffusion_run and chain_eval:
            e = json.load(open(chain_eval[-1]))
            ax.plot(
                [final],
                [e["test_bpd"]],
                "*",
                ms=12,
                color=color,
                label=f"chain full T = 1000 bound, 100 test images: {e['test_bpd']:.3f}",
            )
    for run in extra:
        rows = read_metrics(run)
        cfg = json.load(open(os.path.join(run, "config.json")))
        name = cfg["schedule"] + (", minimise-variance" if cfg.get("minimise_variance") else "")
        ax.plot(
            [r["seconds"] for r in rows],
            [r["test_bpd"] for r in rows],
            "s--",
            ms=3,
            alpha=0.6,
            label=f"VDM, {name} (not side by side)",
        )
    ax.set_ylim(1.7, 3.2)
    ax.set_xlabel("training seconds (one thread each, side by side on the shared 2-core machine)")
    ax.set_ylabel("bits/dim (test)")
    ax.set_title("mnist5k, seed 0: bits/dim against training time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("variance", help="spread of the loss estimate on one batch, per run")
    v.add_argument("runs", nargs="+")
    v.add_argument("--repeats", type=int, default=200)
    v.add_argument("--batch", type=int, default=64)
    v.add_argument("--seed", type=int, default=0)
    f = sub.add_parser("figure", help="bits/dim against training seconds")
    f.add_argument("--vdm", required=True)
    f.add_argument("--diffusion", required=True)
    f.add_argument("--extra", nargs="*", default=[])
    f.add_argument("--out", default="docs/figures/vdm-bpd-vs-time.png")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.cmd == "variance":
        for run in args.runs:
            print(json.dumps(spread(run, args.repeats, args.batch, args.seed)), flush=True)
    else:
        figure(args.vdm, args.diffusion, args.out, args.extra)


if __name__ == "__main__":
    main()
