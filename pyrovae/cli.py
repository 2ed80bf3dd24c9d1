"""``pyrovae`` command line: ``pyrovae train {vae,diffusion} [...]``,
``pyrovae sample {vae,diffusion} RUN``, ``pyrovae evaluate {vae,diffusion} RUN``,
``pyrovae bench``.

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
from pyrovae.parts import GUIDES, LIKELIHOODS, PRIORS
from pyrovae.vae import NETS


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
    p.add_argument("--optimizer", default=d.optimizer, choices=("adam", "clippedadam"), help="pyro.optim optimiser (clippedadam clamps each gradient entry to 10)")
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=("constant", "cosine", "exponential"), help="learning-rate schedule, stepped every step")
    p.add_argument("--lr-gamma", type=positive_float, default=d.lr_gamma, help="lr factor per epoch of --lr-schedule exponential")
    p.add_argument("--warmup-steps", type=non_negative_int, default=d.warmup_steps, help="linear learning-rate warm-up over N steps")
    p.add_argument("--grad-clip", type=positive_float, default=d.grad_clip, help="clip the global gradient norm to this")
    p.add_argument("--ema-decay", type=positive_float, default=d.ema_decay, help="keep an EMA of the weights (e.g. 0.999); evaluate and sample with it")
    p.add_argument("--eval-every", type=positive_int, default=d.eval_every, help="test ELBO every N epochs (and after the last)")
    p.add_argument("--precision", default=d.precision, choices=("fp32", "bf16"), help="bf16: torch.autocast around the ELBO")
    p.add_argument("--tensorboard", action="store_true", help="also log metrics to TensorBoard (needs the tensorboard package)")
    p.add_argument("--nan-policy", default=d.nan_policy, choices=("stop", "skip"), help="a NaN/inf loss or gradient: stop (keeping the last checkpoint) or skip the step and count it in metrics.csv")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue the run in this folder (or checkpoint file) with its saved settings; flags given that change the model or optimiser are an error")


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
    vae.add_argument("--prior", default=d.prior, choices=tuple(PRIORS), help="prior p(z)")
    vae.add_argument("--guide", default=d.guide, choices=tuple(GUIDES), help="encoder q(z|x)")
    vae.add_argument("--likelihood", default=d.likelihood, choices=LIKELIHOODS, help="p(x|z); only bernoulli binarises the data")
    vae.add_argument("--net", default="mlp", choices=tuple(NETS), help="encoder/decoder networks (conv needs image data)")
    vae.add_argument("--iwae-k", type=non_negative_int, default=d.iwae_k, help="IWAE-k log-likelihood on the test split after each evaluation (0: off)")

    add_diffusion_train_parser(models, d)
    add_run_parsers(commands)
    add_bench_parser(commands)
    return parser


def add_diffusion_train_parser(train_models, d) -> None:
    """``pyrovae train diffusion``."""
    from pyrovae.diffusion.chain import PARAMETERIZATIONS, VARIANCES
    from pyrovae.diffusion.schedule import SCHEDULES
    from pyrovae.recipes.diffusion import NETS
    from pyrovae.infer.diffusion_elbo import TIME_SAMPLERS
    from pyrovae.infer.losses import OBJECTIVES

    p = train_models.add_parser("diffusion", help="train a diffusion model (a hierarchical VAE) by SVI", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_train_args(p, d)
    p.add_argument("--T", type=positive_int, default=d.T, help="number of diffusion steps")
    p.add_argument("--schedule", default=d.schedule, choices=SCHEDULES, help="noise schedule beta_t")
    p.add_argument("--net", default="auto", choices=NETS, help="denoiser (auto: unet for images, mlp for 2-D data)")
    p.add_argument("--channels", type=positive_int, default=d.channels, help="U-Net base channels")
    p.add_argument("--hidden", type=positive_int, nargs="+", default=[256, 256, 256], help="MLP denoiser widths (one repeated width)")
    p.add_argument("--objective", default=d.objective, choices=OBJECTIVES, help="elbo (the bound), simple (Ho et al.'s L_simple, not the ELBO) or hybrid (learned variances); default hybrid for images, elbo for 2-D data")
    p.add_argument("--parameterization", default=d.parameterization, choices=PARAMETERIZATIONS, help="what the denoiser predicts")
    p.add_argument("--variance", default=d.variance, choices=VARIANCES, help="sigma_t^2 of p_theta(x_{t-1}|x_t); default learned for images, beta_tilde for 2-D data")
    p.add_argument("--time-sampler", default=d.time_sampler, choices=TIME_SAMPLERS, help="how t is drawn per example")
    p.add_argument("--sample-steps", type=positive_int, default=d.sample_steps, help="respaced steps for the samples figure")
    p.add_argument("--test-particles", type=positive_int, default=1, help="draws of t per test example for the per-epoch (unbiased) test ELBO")
    # Defaults that give digit-like samples and about 2 bits/dim on mnist5k in a
    # few minutes on 2 CPU cores (docs/diffusion.md), with EMA weights for evaluation.
    p.set_defaults(epochs=20, batch_size=64, lr=5e-4, objective=None, variance=None, ema_decay=0.995, eval_every=5)


def add_run_parsers(commands) -> None:
    """``pyrovae sample {vae,diffusion} RUN`` and ``pyrovae evaluate {vae,diffusion} RUN``."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    sample = commands.add_parser("sample", help="draw samples from a trained run").add_subparsers(dest="model", required=True)
    evaluate = commands.add_parser("evaluate", help="evaluate a trained run on its test split").add_subparsers(dest="model", required=True)
    for model in ("vae", "diffusion"):
        p = sample.add_parser(model, help=f"samples of a trained {model} as a PNG", formatter_class=fmt)
        add_load_args(p)
        p.add_argument("--n", type=positive_int, default=None, help="number of samples (default 64 images, 2000 points)")
        p.add_argument("--out", default=None, help="PNG to write (default RUN/samples-<seed>.png)")
        if model == "diffusion":
            p.add_argument("--steps", type=positive_int, default=None, help="respace the chain to K steps (default: all T)")
    p = evaluate.add_parser("vae", help="test ELBO (and IWAE-k log-likelihood) of a trained VAE", formatter_class=fmt)
    add_load_args(p)
    p.add_argument("--test-particles", type=positive_int, default=None, help="particles for the test ELBO (default: the run's)")
    p.add_argument("--iwae-k", type=non_negative_int, default=None, help="IWAE-k estimate of log p(x) with k importance samples (default: the run's; 0 off)")
    p = evaluate.add_parser("diffusion", help="the full-T bound (bits/dim for images) on the first N test examples", formatter_class=fmt)
    add_load_args(p)
    p.add_argument("--n", type=positive_int, default=100, help="first N test examples")
    p.add_argument("--steps", type=positive_int, default=None, help="bound of the chain respaced to K steps (default: all T)")
    p.add_argument("--chunk-size", type=positive_int, default=512, help="(t, example) pairs per network call")


def add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--device", default="auto", help=f"{'|'.join(DEVICES)} or cuda:N (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights even if the run kept an EMA")


def given_options(argv: list[str]) -> set[str]:
    """The destinations of the options written on the command line ``argv``
    (not filled in from defaults): the parser is rebuilt with every default
    suppressed, so only given options reach the namespace."""
    parser = build_parser()
    pending = [parser]
    while pending:
        for action in pending.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                pending.extend(action.choices.values())
            else:
                action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


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

    run(args.workloads or WORKLOADS, args.device, args.smoke, args.repeats, args.json, args.seed, args.threads)
    return 0


def config_from_args(args: argparse.Namespace):
    from pyrovae.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if args.model == "diffusion":
        # improved DDPM's hybrid objective with learned variances is what gets
        # images to ~2 bits/dim in minutes; the 2-D toys train best on the plain
        # bound with fixed variances.
        image = args.data not in datasets.TOY_DATASETS
        values["objective"] = values["objective"] or ("hybrid" if image else "elbo")
        values["variance"] = values["variance"] or ("learned" if image else "beta_tilde")
    return TrainConfig(**values)


def resumed_config(args: argparse.Namespace, argv: list[str]):
    """``--resume RUN``: the run's saved config, with the options written on
    the command line on top (a changed model setting is then reported by
    ``train`` as a mismatch). The output folder is RUN unless ``--out`` is given."""
    from pyrovae.checkpoint import load_checkpoint
    from pyrovae.train import TrainConfig

    given = given_options(argv)
    saved = load_checkpoint(args.resume)["config"]
    values = {**saved, **{k: v for k, v in dataclasses.asdict(config_from_args(args)).items() if k in given}}
    values.update(out=args.out, resume=args.resume)
    return TrainConfig.from_dict(values)


def run_train(args: argparse.Namespace, argv: list[str]) -> int:
    from pyrovae.train import train

    cfg = resumed_config(args, argv) if args.resume else config_from_args(args)
    result = train(cfg)
    if result.metrics:  # rank 0 (only it evaluates under torchrun)
        print(f"done: test ELBO {result.metrics[-1]['test_elbo']:.2f}; files in {result.out_dir}")
    return 0


def run_sample(args: argparse.Namespace) -> int:
    import os

    import pyro

    from pyrovae import plots
    from pyrovae.checkpoint import checkpoint_path, load

    model, cfg = load(args.run, model=args.model, ema=args.ema, device=args.device)
    pyro.set_rng_seed(args.seed)
    ds = datasets.load_dataset(cfg.data, cfg.data_dir)
    out = args.out or os.path.join(os.path.dirname(checkpoint_path(args.run)), f"samples-{args.seed}.png")
    if args.model == "diffusion":
        from pyrovae.recipes.diffusion import write_samples

        steps = args.steps or model.T
        if steps > model.T:
            raise ValueError(f"--steps must be <= T = {model.T}, got {steps}")
        out = args.out or os.path.join(os.path.dirname(checkpoint_path(args.run)), f"samples-{steps}.png")
        write_samples(out, model, ds, steps, ds.x_test[:1000].to(next(model.parameters()).device), args.n)
    elif ds.is_image:
        plots.save_image_grid(out, model.sample(args.n or 64), ds.image_shape, title=f"samples, {cfg.model} on {ds.name}")
    else:
        plots.save_scatter(out, model.sample(args.n or 2000), title=f"samples, {cfg.model} on {ds.name}")
    print(f"wrote {out}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    import pyro

    from pyrovae.checkpoint import load
    from pyrovae.train import RECIPES

    model, cfg = load(args.run, model=args.model, ema=args.ema, device=args.device)
    pyro.set_rng_seed(args.seed)
    recipe = RECIPES[cfg.model]
    ds = datasets.load_dataset(cfg.data, cfg.data_dir).subset(cfg.train_size, cfg.test_size)
    x_test = recipe.prepare_test(cfg, ds.x_test.to(next(model.parameters()).device))
    if args.model == "diffusion":
        from pyrovae.recipes.diffusion import evaluate_bound

        result = evaluate_bound(model, x_test[: args.n], args.steps, args.chunk_size, args.run)
    else:
        overrides = {k: getattr(args, k) for k in ("test_particles", "iwae_k") if getattr(args, k) is not None}
        result = recipe.evaluate(dataclasses.replace(cfg, **overrides), model, x_test)
    # the per-t terms go to the run's evaluate-<steps>.json, not the terminal
    shown = {k: v for k, v in result.items() if not isinstance(v, list)}
    print(json.dumps({"run": args.run, "test_size": len(x_test), **shown}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    commands = {"train": lambda: run_train(args, argv), "sample": lambda: run_sample(args), "evaluate": lambda: run_evaluate(args), "bench": lambda: run_bench(args)}
    try:
        return commands[args.command]()
    # OSError: unreadable or unwritable files, a full disk; FloatingPointError: a NaN loss (train.NonFiniteLossError).
    except (ValueError, TypeError, OSError, FloatingPointError) as err:
        print(f"pyrovae: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
