"""``pyrovae`` command line: ``pyrovae train vae [...]``, ``pyrovae bench [...]``.

Every command is reachable in-process as ``main(argv)``, which returns the
exit code (argparse's usage errors exit with code 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pyrovae import data as datasets
from pyrovae.device import DEVICES
from pyrovae.infer import ELBOS


def _defaults():
    from pyrovae.train import TrainConfig

    return TrainConfig()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def add_common_train_args(p: argparse.ArgumentParser, d) -> None:
    p.add_argument("--data", default=d.data, choices=datasets.DATASETS, help="dataset (default %(default)s)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's files (fashion-mnist IDX files)")
    p.add_argument("--train-size", type=positive_int, default=None, help="use only the first N training examples")
    p.add_argument("--test-size", type=positive_int, default=None, help="use only the first N test examples")
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="passes over the training set (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="default %(default)s")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="Adam learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default %(default)s)")
    p.add_argument("--device", default=d.device, help=f"{'|'.join(DEVICES)} or cuda:N (default %(default)s)")
    p.add_argument("--out", default=None, help="run folder (default runs/<model>-<data>-<timestamp>)")
    p.add_argument("--no-validate", dest="validate", action="store_false", help="turn off pyro.enable_validation (faster)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def build_parser() -> argparse.ArgumentParser:
    d = _defaults()
    parser = argparse.ArgumentParser(prog="pyrovae", description="VAEs and diffusion models as Pyro model/guide pairs trained by SVI.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model")
    models = train.add_subparsers(dest="model", required=True)
    vae = models.add_parser("vae", help="train a VAE by SVI", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_train_args(vae, d)
    vae.add_argument("--binarize", default=d.binarize, choices=datasets.BINARIZE, help="binarisation of pixel values for the Bernoulli likelihood")
    vae.add_argument("--z-dim", type=positive_int, default=d.z_dim, help="latent size")
    vae.add_argument("--hidden", type=positive_int, nargs="+", default=d.hidden, help="hidden layer sizes of encoder (decoder mirrors)")
    vae.add_argument("--elbo", default=d.elbo, choices=tuple(ELBOS), help="ELBO estimator")
    vae.add_argument("--kl-warmup", type=non_negative_int, default=d.kl_warmup, metavar="EPOCHS", help="KL weight rises linearly from 0 to 1 over this many epochs (0: no warm-up)")
    vae.add_argument("--test-particles", type=positive_int, default=d.test_particles, help="particles for the test ELBO")
    add_diffusion_parsers(commands, models, d)
    add_bench_parser(commands)
    return parser


def add_diffusion_parsers(commands, train_models, d) -> None:
    """``train diffusion``, ``sample diffusion`` and ``evaluate diffusion``."""
    from pyrovae.diffusion.chain import PARAMETERIZATIONS, VARIANCES
    from pyrovae.diffusion.schedule import SCHEDULES
    from pyrovae.diffusion.training import NETS
    from pyrovae.infer.diffusion_elbo import OBJECTIVES, TIME_SAMPLERS

    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = train_models.add_parser("diffusion", help="train a diffusion model (a hierarchical VAE) by SVI", formatter_class=fmt)
    add_common_train_args(p, d)
    p.add_argument("--T", type=positive_int, default=d.T, help="number of diffusion steps")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES, help="noise schedule beta_t")
    p.add_argument("--net", default=d.net, choices=NETS, help="denoiser (auto: unet for images, mlp for 2-D data)")
    p.add_argument("--channels", type=positive_int, default=d.channels, help="U-Net base channels")
    p.add_argument("--hidden", type=positive_int, nargs="+", default=[256, 256, 256], help="MLP denoiser widths (one repeated width)")
    p.add_argument("--objective", default=d.objective, choices=OBJECTIVES, help="elbo (the bound), simple (Ho et al.'s L_simple, not the ELBO) or hybrid (learned variances)")
    p.add_argument("--parameterization", default=d.parameterization, choices=PARAMETERIZATIONS, help="what the denoiser predicts")
    p.add_argument("--variance", default=d.variance, choices=VARIANCES, help="sigma_t^2 of p_theta(x_{t-1}|x_t)")
    p.add_argument("--time-sampler", default=d.time_sampler, choices=TIME_SAMPLERS, help="how t is drawn per example")
    p.add_argument("--sample-steps", type=positive_int, default=d.sample_steps, help="respaced steps for the samples figure")
    p.add_argument("--test-particles", type=positive_int, default=1, help="draws of t per test example for the per-epoch (unbiased) test ELBO")

    sample = commands.add_parser("sample", help="draw samples from a trained model").add_subparsers(dest="model", required=True)
    p = sample.add_parser("diffusion", help="ancestral sampling, all T steps or respaced", formatter_class=fmt)
    p.add_argument("--run", required=True, help="run folder written by `pyrovae train diffusion`")
    p.add_argument("--steps", type=positive_int, default=None, help="respace the chain to K steps (default: all T)")
    p.add_argument("--n", type=positive_int, default=None, help="number of samples (default 64 images, 2000 points)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--out", default=None, help="PNG to write (default RUN/samples-<K>.png)")
    p.add_argument("--device", default="cpu", help=f"{'|'.join(DEVICES)} or cuda:N")

    evaluate = commands.add_parser("evaluate", help="evaluate a trained model").add_subparsers(dest="model", required=True)
    p = evaluate.add_parser("diffusion", help="the full-T bound (bits/dim for images) on the first N test examples", formatter_class=fmt)
    p.add_argument("--run", required=True, help="run folder written by `pyrovae train diffusion`")
    p.add_argument("--n", type=positive_int, default=100, help="first N test examples")
    p.add_argument("--steps", type=positive_int, default=None, help="bound of the chain respaced to K steps (default: all T)")
    p.add_argument("--chunk-size", type=positive_int, default=512, help="(t, example) pairs per network call")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="cpu", help=f"{'|'.join(DEVICES)} or cuda:N")


def run_diffusion_command(args: argparse.Namespace) -> int:
    """``sample diffusion`` / ``evaluate diffusion`` on a finished run."""
    import json
    import os

    import pyro
    import torch

    from pyrovae import plots
    from pyrovae.device import resolve_device
    from pyrovae.diffusion.training import load_run, write_samples

    try:
        chain, cfg, ds = load_run(args.run, resolve_device(args.device))
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"pyrovae: error: {err}", file=sys.stderr)
        return 1
    pyro.set_rng_seed(args.seed)
    steps = args.steps or chain.T
    if steps > chain.T:
        print(f"pyrovae: error: --steps must be <= T = {chain.T}, got {steps}", file=sys.stderr)
        return 1
    if args.command == "sample":
        path = args.out or os.path.join(args.run, f"samples-{steps}.png")
        x_test = ds.x_test[:1000]
        write_samples(path, chain, ds, steps, x_test, args.n)
        print(f"wrote {path}")
        return 0
    from pyrovae.diffusion.training import DiffusionRecipe

    x0 = DiffusionRecipe().prepare_test(cfg, ds.x_test[: args.n])
    with torch.no_grad():
        bound = chain.respaced(steps).full_bound(x0, args.chunk_size) if steps != chain.T else chain.full_bound(x0, args.chunk_size)
    result = {
        "n": len(x0),
        "steps": steps,
        "nats": bound["total"].mean().item(),
        "bits_per_dim": bound["bits_per_dim"].mean().item(),
        "prior_nats": bound["prior"].mean().item(),
        "decoder_nats": bound["terms"][:, 0].mean().item(),
        "terms_nats": bound["terms"].mean(0).tolist(),
    }
    name = f"evaluate-{steps}"
    with open(os.path.join(args.run, name + ".json"), "w") as f:
        json.dump(result, f, indent=2)
    plots.plot_bound_terms(os.path.join(args.run, name + ".png"), result["prior_nats"], result["terms_nats"], f"bound terms, {len(x0)} test examples, {steps} steps")
    unit = f"{result['bits_per_dim']:.4f} bits/dim" if chain.decoder == "discretised" else f"{result['nats']:.4f} nats/example"
    print(f"-ELBO on the first {len(x0)} test examples ({steps} steps): {unit}; files {name}.json/.png in {args.run}")
    return 0


def run_train_diffusion(args: argparse.Namespace) -> int:
    from pyrovae.train import train

    try:
        result = train(config_from_args(args))
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"pyrovae: error: {err}", file=sys.stderr)
        return 1
    last = result.metrics[-1]
    bpd = f" ({last['test_bpd']:.3f} bits/dim)" if "test_bpd" in last else ""
    print(f"done: test ELBO {last['test_elbo']:.2f} nats/example{bpd}; files in {result.out_dir}")
    return 0


def add_bench_parser(commands) -> None:
    from pyrovae.bench import WORKLOADS

    bench = commands.add_parser("bench", help="time our steps against plain PyTorch and Pyro's ELBOs", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("workloads", nargs="*", metavar="WORKLOAD", help=f"any of {', '.join(WORKLOADS)} (default: all)")
    bench.add_argument("--device", default="cpu", help=f"{'|'.join(DEVICES)} or cuda:N")
    bench.add_argument("--repeats", type=positive_int, default=None, help="timed repeats per variant in the fast cases (default: 31; the slow ones take 7; 2 each with --smoke)")
    bench.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    bench.add_argument("--smoke", action="store_true", help="tiny sizes and 2 repeats: checks that every variant runs, measures nothing")
    bench.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads for the run (default: torch's own choice)")
    bench.add_argument("--seed", type=int, default=0, help="random seed")


def run_bench(args: argparse.Namespace) -> int:
    from pyrovae.bench import WORKLOADS, run

    try:
        run(args.workloads or WORKLOADS, args.device, args.smoke, args.repeats, args.json, args.seed, args.threads)
    except (ValueError, OSError) as err:
        print(f"pyrovae: error: {err}", file=sys.stderr)
        return 1
    return 0


def config_from_args(args: argparse.Namespace):
    from pyrovae.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return run_bench(args)
    if args.command == "train" and args.model == "vae":
        from pyrovae.train import train

        cfg = config_from_args(args)
        try:
            result = train(cfg)
        except (ValueError, TypeError, FileNotFoundError) as err:
            print(f"pyrovae: error: {err}", file=sys.stderr)
            return 1
        print(f"done: test ELBO {result.metrics[-1]['test_elbo']:.2f} nats/image; files in {result.out_dir}")
        return 0
    if args.command == "train" and args.model == "diffusion":
        return run_train_diffusion(args)
    if args.command in ("sample", "evaluate") and args.model == "diffusion":
        return run_diffusion_command(args)
    raise AssertionError(f"unhandled command {args}")


if __name__ == "__main__":
    sys.exit(main())
