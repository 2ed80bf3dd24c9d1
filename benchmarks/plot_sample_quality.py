"""Plot sample quality against sampling steps from ``pyrovae evaluate`` results (issue 26 item 4).

    python benchmarks/plot_sample_quality.py OUT.png RESULT.json [RESULT.json ...] [--title TEXT]

Every figure comes from the product's command; this script only draws it.
Each RESULT.json is the output of one

    pyrovae evaluate diffusion|vdm RUN --n 8 --samples N --sampler S --steps K [--eta 0] > RESULT.json

(its last line is the JSON object), one file per (sampler, steps). The figure
has FD in the judge's features against the steps, a line per run and sampler (log-log),
and beside it the seconds per 1,000 samples; the table of the same points is
printed as Markdown.
"""

from __future__ import annotations

import argparse
import collections
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path: str) -> dict:
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip().startswith("{")]
    if not lines:
        raise SystemExit(f"{path}: no JSON line (is it the output of pyrovae evaluate ... --samples N?)")
    row = json.loads(lines[-1])
    for key in ("sampler", "sample_steps", "fd_judge", "seconds_per_1000_samples"):
        if key not in row:
            raise SystemExit(f"{path}: no {key!r}: run pyrovae evaluate with --samples N")
    return row


def sampler_name(row: dict) -> str:
    """The sampler, with DDIM's eta where it is not 0 (another sampler in effect)."""
    eta = row.get("eta") or 0
    return f"{row['sampler']}, eta {eta:g}" if eta else row["sampler"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("results", nargs="+")
    p.add_argument("--title", default="sample quality against steps")
    args = p.parse_args()
    rows = sorted((read(path) for path in args.results), key=lambda r: (r["run"], sampler_name(r), r["sample_steps"]))
    runs = {r["run"] for r in rows}
    lines = collections.defaultdict(list)
    for r in rows:
        lines[f"{r['run']}: {sampler_name(r)}" if len(runs) > 1 else sampler_name(r)].append(r)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for sampler, points in lines.items():
        steps = [r["sample_steps"] for r in points]
        a.plot(steps, [r["fd_judge"] for r in points], "o-", label=sampler)
        b.plot(steps, [r["seconds_per_1000_samples"] for r in points], "o-", label=sampler)
    for ax, label in ((a, "FD in the judge's features (lower is better)"), (b, "seconds per 1,000 samples")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sampling steps (network evaluations)")
        ax.set_ylabel(label)
    a.legend(fontsize=8)  # one legend: the same lines in both panels
    n = {r.get("scored_samples") for r in rows}
    fig.suptitle(f"{args.title} ({', '.join(str(k) for k in sorted(n, key=str))} samples per point)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print("| run | sampler | steps | FD (judge) | KID (judge) | s / 1,000 samples |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        kid = r.get("kid_judge", float("nan"))
        print(
            f"| {r['run']} | {sampler_name(r)} | {r['sample_steps']} | {r['fd_judge']:.1f} | {kid:.1f} | "
            f"{r['seconds_per_1000_samples']:.0f} |"
        )


if __name__ == "__main__":
    main()
