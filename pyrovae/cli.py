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
    add_bench_parser(commands)
    return parser


def add_bench_parser(commands) -> None:
    from pyrovae.bench import WORKLOADS

    bench = commands.add_parser("bench", help="time our steps against plain PyTorch and Pyro's ELBOs", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("workloads", nargs="*", metavar="WORKLOAD", help=f"any of {', '.join(WORKLOADS)} (default: all)")
    bench.add_argument("--device", default="cpu", help=f"{'|'.join(DEVICES)} or cuda:N")
    bench.add_argument("--repeats", type=positive_int, default=None, help="timed repeats per variant (default: 11, or 2 with --smoke)")
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
    raise AssertionError(f"unhandled command {args}")


if __name__ == "__main__":
    sys.exit(main())
