"""The measurements behind docs/hvae.md: VAE vs hierarchical VAE under one
stopping rule (MNIST-5k), at a fixed number of epochs (Fashion-MNIST, equal
wall time).

    # MNIST-5k, the issue's rule: early stopping on 500 held-out training images, capped at 300 epochs
    nice -n 10 python docs/measure_hvae.py vae hvae-bottom-up --seeds 0 1 2 \\
        --log docs/figures/hvae-mnist5k-quality.jsonl
    # Fashion-MNIST, 10 epochs on all 60,000 training images
    nice -n 10 python docs/measure_hvae.py vae vae-deep hvae-bottom-up hvae-top-down --data fashion-mnist \\
        --epochs 10 --iwae-n 1000 --log docs/figures/hvae-fashion-quality.jsonl
    # seconds per epoch, side by side (for the equal-wall-time rows)
    nice -n 10 python docs/measure_hvae.py vae vae-deep hvae-bottom-up hvae-top-down --time-epochs 3

Each variant trains with the CLI defaults (Adam 1e-3, batch 128, analytic-KL
ELBO, dynamic binarisation). **Early stopping** (without ``--epochs``): the
first 3,500 of MNIST-5k's 4,000 training images train, the last 500 are held
out; every ``--every`` epochs the held-out ELBO (10 particles, fixed
binarisation) is measured and the best weights kept; training stops after
``--patience`` epochs without a better one (counted from the end of the KL
warm-up, if any), or at ``--max-epochs`` (300); with ``--patience 0`` every
model trains to its cap (the equal-wall-time rows) and the best held-out
weights are kept. With ``--epochs N`` every model trains exactly N epochs
on the whole training set (no held-out part) and the last weights are
evaluated. The kept weights are evaluated on the test images
(``--test-n``, all by default): ELBO (10 particles), its named terms, active
units per layer and IWAE-k on the first ``--iwae-n``. One JSON line per run;
``train_seconds`` is the training steps only (the held-out evaluations are
timed apart, ``held_out_seconds``); ``curve`` is the held-out ELBO and
per-layer KL at each check.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import pyro
import torch

from pyrovae import data as datasets
from pyrovae.hvae import active_units, bound_terms, build_hvae
from pyrovae.infer import TraceAnalyticKL_ELBO, evaluate_iwae
from pyrovae.vae import build_vae

# name -> (builder, KL warm-up epochs)
VARIANTS = {
    "vae": (lambda: build_vae(784), 0),
    # the 1-layer control with the default HVAE's deterministic depth: x -> 400 -> 200 -> z
    "vae-deep": (lambda: build_vae(784, 50, (400, 200)), 0),
    # the default HVAE: the VAE with a layer on top, x -> 400 -> z_1 (50) -> 200 -> z_2 (20)
    "hvae-bottom-up": (lambda: build_hvae(784, (50, 20), (400, 200), encoder="bottom-up"), 0),
    "hvae-top-down": (lambda: build_hvae(784, (50, 20), (400, 200), encoder="top-down"), 0),
    # the Ladder VAE's recipe (Sønderby et al. 2016): the KL weight rises linearly from 0 to 1 over the first 50 epochs
    "hvae-top-down-warmup": (lambda: build_hvae(784, (50, 20), (400, 200), encoder="top-down"), 50),
    "hvae-bottom-up-warmup": (lambda: build_hvae(784, (50, 20), (400, 200), encoder="bottom-up"), 50),
    # the IWAE paper's 2-layer shape: z (100, 50), deterministic layers 200, 200 and 100, 100
    "iwae-shape-bottom-up": (lambda: build_hvae(784, (100, 50), ((200, 200), (100, 100)), encoder="bottom-up"), 0),
    "iwae-shape-top-down": (lambda: build_hvae(784, (100, 50), ((200, 200), (100, 100)), encoder="top-down"), 0),
}


def split(data: str, fixed_epochs: bool):
    """(train, held-out or None, test): mnist5k holds out its last 500 training images for the stopping rule."""
    ds = datasets.load_dataset(data)
    x_test = datasets.binarize_test(ds.x_test, "dynamic")
    if fixed_epochs:
        return ds.x_train, None, x_test
    return ds.x_train[:-500], datasets.binarize_test(ds.x_train[-500:], "dynamic"), x_test


def epoch_step(model, optim, elbo, x_train) -> None:
    for idx in torch.randperm(len(x_train)).split(128):
        loss = elbo.differentiable_loss(model.model, model.guide, datasets.binarize(x_train[idx], "dynamic"))
        optim.zero_grad()
        loss.backward()
        optim.step()


def run(variant: str, seed: int, args, fixed_epochs: int | None = None, max_epochs: int = 300) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x_train, x_held, x_test = split(args.data, fixed_epochs is not None)
    build, warmup = VARIANTS[variant]
    warmup = warmup if args.kl_warmup is None else args.kl_warmup
    model = build()
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    elbo = TraceAnalyticKL_ELBO()
    best, best_state, best_epoch, epoch, train_s, held_s, curve = -float("inf"), None, 0, 0, 0.0, 0.0, []
    max_epochs = fixed_epochs or max_epochs
    while epoch < max_epochs and (fixed_epochs or not args.patience or epoch - max(best_epoch, warmup) < args.patience):
        epoch += 1
        if warmup:
            elbo.kl_scale = min(1.0, (epoch - 1) / warmup)
        t0 = time.perf_counter()
        epoch_step(model, optim, elbo, x_train)
        train_s += time.perf_counter() - t0
        if x_held is not None and epoch % args.every == 0:
            t0 = time.perf_counter()
            terms = bound_terms(model, x_held)
            held_s += time.perf_counter() - t0
            curve.append(
                {
                    "epoch": epoch,
                    "elbo": terms["elbo"],
                    **{k: v for k, v in terms.items() if k.startswith("kl_") and k[3:].isdigit()},
                }
            )
            if terms["elbo"] > best:
                best, best_state, best_epoch = terms["elbo"], copy.deepcopy(model.state_dict()), epoch
    if best_state is not None:
        model.load_state_dict(best_state)
    else:
        best_epoch = epoch
    pyro.set_rng_seed(1000 + seed)  # the evaluation's draws
    x_eval = x_test[: args.test_n] if args.test_n else x_test
    t0 = time.perf_counter()
    terms = bound_terms(model, x_eval)
    row = {
        "variant": variant,
        "data": args.data,
        "seed": seed,
        "kl_warmup": warmup,
        "rule": "fixed" if fixed_epochs else ("early-stopping" if args.patience else "best-held-out"),
        "max_epochs": max_epochs,
        "epochs_run": epoch,
        "best_epoch": best_epoch,
        "held_out_elbo": best if x_held is not None else None,
        "train_seconds": train_s,
        "held_out_seconds": held_s,
        "test_n": len(x_eval),
    }
    row.update({f"test_{k}": v for k, v in terms.items()})
    row["active_units"] = active_units(model, x_eval)
    row["train_elbo_first_500"] = bound_terms(model, datasets.binarize_test(x_train[:500], "dynamic"))["elbo"]
    if args.iwae_k:
        n = args.iwae_n
        row[f"test_iwae_{args.iwae_k}"] = evaluate_iwae(model.model, model.guide, x_test[:n], args.iwae_k)["iwae"]
        row["iwae_n"] = min(n, len(x_test))
        row[f"test_elbo_first_{n}"] = bound_terms(model, x_test[:n])["elbo"]
    row["eval_seconds"] = time.perf_counter() - t0
    row["curve"] = curve
    return row


def time_epochs(variants, n: int, data: str) -> None:
    """Seconds per training epoch, the variants interleaved (round-robin, n rounds)
    in one process so that they share the machine's load alike."""
    x_train, _, _ = split(data, False)
    models = {}
    for v in variants:
        build, _ = VARIANTS[v]
        m = build()
        models[v] = (m, torch.optim.Adam(m.parameters(), lr=1e-3), TraceAnalyticKL_ELBO())
        epoch_step(*models[v], x_train)  # warm-up epoch, not timed
    seconds = {v: [] for v in variants}
    for _ in range(n):
        for v in variants:
            t0 = time.perf_counter()
            epoch_step(*models[v], x_train)
            seconds[v].append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "seconds_per_epoch": {v: sorted(s)[len(s) // 2] for v, s in seconds.items()},
                "all": seconds,
                "train_images": len(x_train),
            }
        )
    )


def plot(log: str, out: str) -> None:
    """The held-out ELBO and the per-layer KL against the epoch, seed 0 of each
    early-stopped variant in ``log``, a dot at the kept (best) epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(log)]
    rows = [r for r in rows if r["seed"] == 0 and r.get("curve") and r.get("rule") == "early-stopping"]
    fig, (ax_elbo, ax_kl) = plt.subplots(1, 2, figsize=(11, 4))
    for i, r in enumerate(rows):
        colour = f"C{i}"
        epochs = [c["epoch"] for c in r["curve"]]
        ax_elbo.plot(epochs, [c["elbo"] for c in r["curve"]], color=colour, label=r["variant"])
        ax_elbo.plot([r["best_epoch"]], [r["held_out_elbo"]], "o", color=colour)
        layers = sorted(k for k in r["curve"][0] if k.startswith("kl_"))
        for k, style in zip(layers, ("-", "--", ":")):
            ax_kl.plot(epochs, [c[k] for c in r["curve"]], style, color=colour, label=f"{r['variant']} {k}")
    lo = min(c["elbo"] for r in rows for c in r["curve"][len(r["curve"]) // 10 :])
    ax_elbo.set(
        xlabel="epoch",
        ylabel="held-out ELBO (nats / image)",
        ylim=(lo - 2, None),
        title="held-out ELBO (500 images); dot: kept weights",
    )
    ax_kl.set(
        xlabel="epoch",
        ylabel="KL (nats / image)",
        title="per-layer KL on the held-out images (kl_1 solid, kl_2 dashed)",
    )
    ax_elbo.legend(fontsize=7)
    ax_kl.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def mean_sd(values) -> str:
    values = list(values)
    if len(values) == 1:
        return f"{values[0]:.2f}"
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{m:.2f} ± {sd:.2f}"


def table(log: str, base: str = "vae", paired: str = "hvae-bottom-up") -> None:
    """Markdown tables of ``log``: one row per (variant, rule, cap), mean ± sd over
    its seeds, then ``paired`` minus ``base`` by seed."""
    rows = [json.loads(line) for line in open(log)]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["variant"], r.get("rule"), r.get("max_epochs")), []).append(r)
    iwae = next(k for k in rows[0] if k.startswith("test_iwae_"))
    print(
        f"| model | rule (cap) | seeds | epochs run / best | test ELBO ({rows[0]['test_n']}) | "
        f"{iwae} (first {rows[0]['iwae_n']}) | train ELBO (first 500) | kl_1 / kl_2 | active units | train s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (variant, rule, cap), rs in groups.items():
        kls = " / ".join(
            f"{sum(r.get(f'test_kl_{l}', 0) for r in rs) / len(rs):.1f}" for l in (1, 2) if f"test_kl_{l}" in rs[0]
        )
        units = " / ".join(
            f"{sum(r['active_units'][str(l)] for r in rs) / len(rs):.0f}"
            for l in (1, 2)
            if str(l) in rs[0]["active_units"]
        )
        epochs = ", ".join(f"{r['epochs_run']}/{r['best_epoch']}" for r in rs)
        print(
            f"| {variant} | {rule} ({cap}) | {','.join(str(r['seed']) for r in rs)} | {epochs} | "
            f"{mean_sd(r['test_elbo'] for r in rs)} | {mean_sd(r[iwae] for r in rs)} | "
            f"{mean_sd(r['train_elbo_first_500'] for r in rs)} | {kls} | {units} | "
            f"{mean_sd(r['train_seconds'] for r in rs)} |"
        )
    by_seed = {(r["variant"], r["seed"]): r for r in rows if r.get("rule") == "early-stopping"}
    seeds = sorted(s for v, s in by_seed if v == paired and (base, s) in by_seed)
    if seeds:
        print(f"\n| seed | {paired} - {base}: test ELBO | {iwae} |\n|---|---|---|")
        diffs = [
            (
                by_seed[paired, s]["test_elbo"] - by_seed[base, s]["test_elbo"],
                by_seed[paired, s][iwae] - by_seed[base, s][iwae],
            )
            for s in seeds
        ]
        for s, (d_elbo, d_iwae) in zip(seeds, diffs):
            print(f"| {s} | {d_elbo:+.2f} | {d_iwae:+.2f} |")
        print(f"| mean ± sd | {mean_sd(d for d, _ in diffs)} | {mean_sd(d for _, d in diffs)} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("variants", nargs="*", help=f"any of {', '.join(VARIANTS)}")
    p.add_argument("--data", default="mnist5k", choices=("mnist5k", "fashion-mnist"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--epochs",
        type=int,
        nargs="+",
        help="train exactly this many epochs on the whole training set (one per variant, or one for all); "
        "no early stopping",
    )
    p.add_argument("--iwae-k", type=int, default=1000)
    p.add_argument("--iwae-n", type=int, default=1000, help="IWAE on the first N test images")
    p.add_argument("--test-n", type=int, default=0, help="test ELBO on the first N test images (0: all)")
    p.add_argument(
        "--kl-warmup",
        type=int,
        help="KL warm-up epochs for every variant named (default: each variant's own, 50 for *-warmup, else 0)",
    )
    p.add_argument("--max-epochs", type=int, nargs="+", default=[300], help="the cap (one per variant, or one for all)")
    p.add_argument(
        "--patience", type=int, default=20, help="0: no early stop, train to the cap and keep the best held-out weights"
    )
    p.add_argument("--every", type=int, default=2)
    p.add_argument(
        "--time-epochs",
        type=int,
        default=0,
        help="only time this many epochs per variant, interleaved, and print seconds per epoch",
    )
    p.add_argument("--log", default="hvae-quality.jsonl")
    p.add_argument("--plot", help="draw the curves of --log into this PNG and exit")
    p.add_argument("--table", action="store_true", help="print the markdown tables of --log and exit")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.plot:
        plot(args.log, args.plot)
        return
    if args.table:
        table(args.log)
        return
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"name variants from {', '.join(VARIANTS)}; got {args.variants}")
    if args.time_epochs:
        time_epochs(args.variants, args.time_epochs, args.data)
        return

    def per_variant(values, flag):
        if len(values) not in (1, len(args.variants)):
            p.error(f"{flag} takes one number for all variants or one per variant")
        return values * len(args.variants) if len(values) == 1 else values

    epochs, caps = per_variant(args.epochs or [None], "--epochs"), per_variant(args.max_epochs, "--max-epochs")
    for seed in args.seeds:
        for variant, n_epochs, cap in zip(args.variants, epochs, caps):
            row = run(variant, seed, args, n_epochs, cap)
            print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
            with open(args.log, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
