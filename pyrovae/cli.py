"""``pyrovae`` command line: ``pyrovae train {vae,diffusion} [...]``,
``pyrovae sample {vae,diffusion} RUN``, ``pyrovae evaluate {vae,diffusion} RUN``,
``pyrovae bench``.

Every command is reachable in-process as ``main(argv)``, which returns the
exit code (argparse's usage errors exit with code 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings

from pyrovae import data as datasets
from pyrovae.device import DEVICES
from pyrovae.runs import TrainingInterrupted

# --debug is taken before or after the command (a leaf's default must not hide the top level's).
DEBUG_FLAG = argparse.ArgumentParser(add_help=False)
DEBUG_FLAG.add_argument(
    "--debug",
    action="store_true",
    default=argparse.SUPPRESS,
    help="on an error, show the full message and traceback, not one line",
)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def guidance_weight(text: str) -> float:
    """``--guidance W``: a number w >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a number w >= 0 (0: the conditional model itself), got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def field_value_parser(f: dataclasses.Field):
    """argparse's ``type`` for the config field ``f``: the text as the field's
    number type (``none`` for a field that may be None), checked against the
    field's bounds by the config's own :func:`pyrovae.config.check_field`, so
    that a bad value is a usage error (exit 2) saying what was expected."""
    from pyrovae.config import check_field

    kind = float if "float" in f.type else int
    optional = "None" in f.type

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a number' if kind is float else 'an integer'}, got {text!r}"
            ) from None
        try:
            check_field(f, [value] if f.type.startswith("list") else value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def seed_value(text: str) -> int:
    """``--seed`` of sample, evaluate and bench: the bounds of the config's ``seed``."""
    from pyrovae.config import TrainConfig

    return field_value_parser(next(f for f in dataclasses.fields(TrainConfig) if f.name == "seed"))(text)


seed_value.__name__ = "int"  # argparse names the type in its messages


def field_text_parser(f: dataclasses.Field):
    """argparse's ``type`` for a text field with a ``check`` (a device's spelling,
    VDM's ``time``): a bad value is a usage error (exit 2)."""
    from pyrovae.config import check_field

    def parse(text: str) -> str:
        try:
            check_field(f, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        return text

    parse.__name__ = "str"
    return parse


def device_name(text: str) -> str:
    """``--device`` of sample, evaluate and bench: its spelling checked as train's is."""
    from pyrovae.config import TrainConfig

    return field_text_parser(next(f for f in dataclasses.fields(TrainConfig) if f.name == "device"))(text)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(p: argparse.ArgumentParser, config_cls) -> None:
    """One flag per field of ``config_cls`` (a :mod:`pyrovae.config` dataclass)
    whose metadata has ``cli``: its help, choices and bounds come from the
    metadata and its default from the dataclass, shown once in ``--help``.

    Every flag's default is ``SUPPRESS``, so the namespace holds exactly the
    flags given on the command line: the config's defaults fill in the rest
    (:func:`config_from_args`), and a resumed run takes only the given flags as
    changes."""
    defaults = config_cls()
    for f in dataclasses.fields(config_cls):
        if not f.metadata.get("cli", True):
            continue
        default = getattr(defaults, f.name)
        help_text = f.metadata.get("help", "")
        if f.type == "bool":
            if default:
                p.add_argument(flag_name("no_" + f.name), dest=f.name, action="store_false", help=help_text)
            else:
                p.add_argument(flag_name(f.name), dest=f.name, action="store_true", help=help_text)
            continue
        number = "int" in f.type or "float" in f.type
        shown = " ".join(map(str, default)) if isinstance(default, list) else "none" if default is None else default
        # A string field that may be None says in its help what None means.
        suffix = "" if default is None and not number else f" (default: {shown})"
        kwargs = {"dest": f.name, "help": (help_text + suffix).replace("%", "%%")}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
            if hasattr(kwargs["choices"], "canonical"):  # other spellings of a name are accepted
                kwargs["type"] = kwargs["choices"].canonical
        elif number:
            kwargs["type"] = field_value_parser(f)
            kwargs["metavar"] = ("N" if "int" in f.type else "X") + ("|none" if "None" in f.type else "")
        elif "check" in f.metadata:
            kwargs["type"] = field_text_parser(f)
            kwargs["metavar"] = f.name.upper()
        if f.type.startswith("list"):
            kwargs["nargs"] = "+"
        if f.name in ("out", "resume"):
            kwargs["metavar"] = "RUN"
        p.add_argument(flag_name(f.name) if f.name != "T" else "--T", **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from pyrovae.recipes import MODELS

    parser = argparse.ArgumentParser(
        prog="pyrovae", description="VAEs and diffusion models as Pyro model/guide pairs trained by SVI."
    )
    parser.add_argument(
        "--debug", action="store_true", help="on an error, show the full message and traceback, not one line"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model")
    models = train.add_subparsers(dest="model", required=True)
    for name, entry in MODELS.items():
        summary = (entry.config.__doc__ or name).split(":", 1)[-1].strip().split(".")[0]
        p = models.add_parser(
            name, help=summary, description=summary, argument_default=argparse.SUPPRESS, parents=[DEBUG_FLAG]
        )
        add_config_flags(p, entry.config)
    add_run_parsers(commands)
    add_bench_parser(commands)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict:
    """``{name: parser}`` of a parser's sub-commands, in the order they were added."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _usage_items(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's arguments as usage items (``RUN``, ``[--elbo analytic|trace]``, ``[--quiet]``), ``--debug``
    and ``--help`` left out."""
    items = []
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction) or "--debug" in a.option_strings:
            continue
        if not a.option_strings:
            name = (a.metavar or a.dest).upper()
            items.append(f"[{name} ...]" if a.nargs in ("*", "+") else name)
            continue
        flag = max(a.option_strings, key=len)
        if a.nargs == 0:
            items.append(f"[{flag}]")
        elif a.choices:
            items.append(f"[{flag} {'|'.join(map(str, a.choices))}]")
        else:
            value = a.metavar or ("N" if a.type in (int, positive_int, non_negative_int) else a.dest.upper())
            items.append(f"[{flag} {value}]")
    return items


def _wrap(head: str, items: list[str], width: int = 110) -> list[str]:
    lines, line = [], head
    for item in items:
        if len(line) + 1 + len(item) > width and line.strip():
            lines.append(line)
            line = " " * (len(head) + 1) + item
        else:
            line = f"{line} {item}"
    return [*lines, line]


def synopsis() -> str:
    """The command line in a few lines, generated from the parser: each model's own ``train`` flags, the training
    flags every model shares, and the ``sample``, ``evaluate`` and ``bench`` commands. README's synopsis is this
    text (tests/test_cli.py checks it)."""
    commands = _subcommands(build_parser())
    models = _subcommands(commands["train"])
    per_model = {name: _usage_items(p) for name, p in models.items()}
    shared = [i for i in next(iter(per_model.values())) if all(i in items for items in per_model.values())]
    lines = []
    for name, items in per_model.items():
        lines += _wrap(f"pyrovae train {name}", [i for i in items if i not in shared] + ["[TRAINING FLAGS]"])
    lines += _wrap("TRAINING FLAGS:", shared)
    for command in ("sample", "evaluate"):
        for name, p in _subcommands(commands[command]).items():
            lines += _wrap(f"pyrovae {command} {name}", _usage_items(p))
    lines += _wrap("pyrovae bench", _usage_items(commands["bench"]))
    return "\n".join(lines)


def add_run_parsers(commands) -> None:
    """``pyrovae sample MODEL RUN`` and ``pyrovae evaluate MODEL RUN`` for every model."""
    from pyrovae.recipes import MODELS

    sample = commands.add_parser("sample", help="draw samples from a trained run").add_subparsers(
        dest="model", required=True
    )
    evaluate = commands.add_parser("evaluate", help="evaluate a trained run on its test split").add_subparsers(
        dest="model", required=True
    )
    for model, entry in MODELS.items():
        p = sample.add_parser(
            model,
            help=f"samples of a trained {model}: all as .npy, at most a grid's worth as a PNG",
            parents=[DEBUG_FLAG],
        )
        add_load_args(p)
        p.add_argument(
            "--n",
            type=positive_int,
            default=None,
            help=f"number of samples (default: {GRID_IMAGES} images, {GRID_POINTS} points)",
        )
        p.add_argument(
            "--out",
            default=None,
            help="PNG to write; the samples go beside it as .npy (default: RUN/samples-<seed>.png)",
        )
        p.add_argument(
            "--chunk-size",
            type=positive_int,
            default=SAMPLE_CHUNK,
            help=f"samples drawn at a time: memory is bounded by this, not by --n (default: {SAMPLE_CHUNK})",
        )
        p.add_argument(
            "--label",
            default=None,
            metavar="K|NAME|all",
            help="a run trained with --conditional: samples of this class (its number or name), or all: a row per "
            "class (--n then counts the samples per class; default: all, 8 per class)",
        )
        p.add_argument(
            "--guidance",
            type=guidance_weight,
            default=None,
            metavar="W",
            help="classifier-free guidance weight w >= 0 of a conditional chain or VDM: (1 + w) eps(x, y) - w eps(x) "
            "(w > 0: not samples of the model's p(x | y))",
        )
        entry.recipe.add_sample_arguments(p)
        p = evaluate.add_parser(model, help=entry.recipe.evaluate_help.format(model=model), parents=[DEBUG_FLAG])
        add_load_args(p, evaluate=True)
        entry.recipe.add_evaluate_arguments(p)


def add_load_args(p: argparse.ArgumentParser, evaluate: bool = False) -> None:
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("--device", type=device_name, default="auto", help=f"{'|'.join(DEVICES)} or cuda:N (default: auto)")
    p.add_argument("--seed", type=seed_value, default=0, metavar="N", help="random seed (default: 0)")
    p.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights even if the run kept an EMA")
    if evaluate:
        p.add_argument(
            "--data",
            default=None,
            metavar="NAME|PATH",
            help="evaluate on this data set's test split (default: the run's); its examples must have the run's shape",
        )


def add_bench_parser(commands) -> None:
    from pyrovae.bench import WORKLOADS

    bench = commands.add_parser(
        "bench", help="time our steps against plain PyTorch and Pyro's ELBOs", parents=[DEBUG_FLAG]
    )
    bench.add_argument("workloads", nargs="*", metavar="WORKLOAD", help=f"any of {', '.join(WORKLOADS)} (default: all)")
    bench.add_argument(
        "--device", type=device_name, default="cpu", help=f"{'|'.join(DEVICES)} or cuda:N (default: cpu)"
    )
    bench.add_argument(
        "--repeats",
        type=positive_int,
        default=None,
        help="timed repeats per variant in the fast cases (default: 31; the slow ones take 7; 2 each with --smoke)",
    )
    bench.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    bench.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes and 2 repeats: checks that every variant runs, measures nothing",
    )
    bench.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch intra-op threads for the run (default: torch's own choice)",
    )
    bench.add_argument("--seed", type=seed_value, default=0, metavar="N", help="random seed (default: 0)")


def run_bench(args: argparse.Namespace) -> int:
    from pyrovae.bench import WORKLOADS, run

    run(args.workloads or WORKLOADS, args.device, args.smoke, args.repeats, args.json, args.seed, args.threads)
    return 0


def config_from_args(args: argparse.Namespace):
    """The config the command line asks for: the model's config with the flags
    given; with ``--resume RUN``, the run's own saved config with the flags
    given on top (``train`` reports a change to the model as a mismatch, and
    without ``--epochs`` the run continues to its own epoch count). The run
    folder is RUN unless ``--out`` is given."""
    from pyrovae.checkpoint import load_checkpoint
    from pyrovae.config import TrainConfig

    given = {k: v for k, v in vars(args).items() if k not in ("command", "model", "debug")}
    if getattr(args, "resume", None) is None:
        return TrainConfig(model=args.model, **given)
    ckpt = load_checkpoint(args.resume)
    saved = ckpt["config"]
    if saved.get("model", "vae") != args.model:
        raise ValueError(
            f"--resume {args.resume!r} is a {saved.get('model', 'vae')!r} run, not {args.model!r}; "
            f"resume it with pyrovae train {saved.get('model', 'vae')}"
        )
    if "epochs" not in given and ckpt["epoch"] >= saved["epochs"]:
        raise ValueError(
            f"run {args.resume!r} has finished its {ckpt['epoch']} epochs; "
            f"give --epochs N with N > {ckpt['epoch']} to train it further"
        )
    return TrainConfig.from_dict({**saved, "out": None, "overwrite": False, **given})


def warn_unfinished_warmup(cfg) -> None:
    """KL warm-up that outlasts the run ends training on beta < 1: not the ELBO."""
    warmup = getattr(cfg, "kl_warmup", 0)
    if warmup and cfg.epochs - 1 < warmup:
        beta = (cfg.epochs - 1) / warmup
        print(
            f"pyrovae: warning: --kl-warmup {warmup} does not end within --epochs {cfg.epochs}: "
            "the last epoch trains with "
            f"KL weight beta = {beta:.3g}, not the ELBO (beta = 1); use --kl-warmup < --epochs",
            file=sys.stderr,
        )


def run_train(args: argparse.Namespace) -> int:
    from pyrovae.train import train

    cfg = config_from_args(args)
    warn_unfinished_warmup(cfg)
    result = train(cfg)
    if result.metrics:  # rank 0 (only it evaluates under torchrun)
        last = result.metrics[-1]
        kept = (
            ""
            if result.best_epoch is None
            else f" at epoch {last['epoch']}; the model kept is epoch {result.best_epoch}'s"
        )
        print(f"done: test ELBO {last['test_elbo']:.2f}{kept}; files in {result.out_dir}")
    return 0


GRID_IMAGES, GRID_POINTS = 64, 2000  # what one PNG shows: an 8 x 8 grid, a scatter
SAMPLE_CHUNK = 1000


def run_sample(args: argparse.Namespace) -> int:
    """Draw ``--n`` samples in chunks of ``--chunk-size`` into a ``.npy`` file
    (written as they come, so memory does not grow with n) and draw the first
    grid's worth as a PNG."""
    import os
    import tempfile

    import numpy as np
    import pyro
    import torch

    from pyrovae import plots
    from pyrovae.checkpoint import TMP_SUFFIX, checkpoint_path, load, load_checkpoint
    from pyrovae.recipes import recipe_for

    folder = os.path.dirname(checkpoint_path(args.run))
    out = args.out or os.path.join(folder, f"samples-{args.seed}.png")
    array_path = os.path.splitext(out)[0] + ".npy"
    check_sample_out(out, array_path, folder)
    model, cfg = load(args.run, model=args.model, ema=args.ema, device=args.device)
    pyro.set_rng_seed(args.seed)
    # Images need only the run's data spec; the 2-D toys' scatter shows their (named, shipped) data.
    ds = datasets.run_spec(load_checkpoint(args.run), cfg)
    if not getattr(cfg, "conditional", False):
        for flag, value in (("--label", args.label), ("--guidance", args.guidance)):
            if value is not None:
                raise ValueError(f"{flag} needs a run trained with --conditional; {args.run!r} is unconditional")
    draw, title = recipe_for(cfg).sampler(model, cfg, ds, args)
    grid = GRID_IMAGES if ds.is_image else GRID_POINTS
    n = args.n or grid
    columns = getattr(draw, "columns", 8)
    if getattr(draw, "labels", None) is not None:  # a conditional run: its labels decide n; each row's first 8 shown
        n = grid = len(draw.labels)
    # Drawn into a temporary file beside it and renamed when complete: a failure or Ctrl-C
    # half-way leaves the previous samples there as they were, and no half-written file.
    folder = os.path.dirname(os.path.abspath(array_path))
    fd, tmp = tempfile.mkstemp(
        dir=folder, prefix=f".{os.path.basename(array_path)}.", suffix=f"{TMP_SUFFIX}{os.getpid()}"
    )
    os.close(fd)
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, ds.x_dim))
        shown = []
        with torch.no_grad():
            for i in range(0, n, args.chunk_size):
                x = draw(min(args.chunk_size, n - i)).float().cpu()
                array[i : i + len(x)] = x.numpy()
                if i < grid:
                    shown.append(x[: grid - i])
        array.flush()
        del array
        os.chmod(tmp, 0o644)
        os.replace(tmp, array_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    shown = torch.cat(shown)
    if columns > 8 and len(shown) % columns == 0:
        shown, columns = shown.reshape(-1, columns, ds.x_dim)[:, :8].reshape(-1, ds.x_dim), 8
    if ds.is_image:
        plots.save_image_grid(out, shown, ds.image_shape, min(columns, len(shown)), title)
    else:
        x_test = run_test_split(args.run, cfg)[:1000]
        plots.save_scatter(
            out,
            torch.cat([x_test, shown]),
            title,
            torch.cat([torch.zeros(len(x_test)), torch.ones(len(shown))]),
            ("test data", "samples"),
        )
    drawn = f"the first {len(shown)} of {n}" if len(shown) < n else "them"
    print(f"wrote {n} samples to {array_path} and drew {drawn} in {out}")
    return 0


def check_sample_out(out: str, array_path: str, run_folder: str) -> None:
    """``sample --out``, checked before anything is drawn or written: a PNG in
    an existing folder, neither it nor its ``.npy`` one of a run's own files
    (this run's, or another's whose folder it names)."""
    import os

    from pyrovae.runs import holds_run, is_run_file

    if not out.lower().endswith(".png"):
        raise ValueError(f"--out must name a .png file (the samples go beside it as .npy), got {out!r}")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out!r}: the folder {parent!r} does not exist")
    for path in (out, array_path):
        name = os.path.basename(path)
        ours = os.path.realpath(parent) == os.path.realpath(run_folder)
        if (ours or holds_run(parent)) and is_run_file(name) and not name.startswith("samples-"):
            whose = "the run's own" if ours else f"the run in {parent!r}'s"
            raise ValueError(
                f"--out {out!r} would replace {whose} {name}; choose another name "
                "(the default is RUN/samples-<seed>.png)"
            )


def run_test_split(run: str, cfg, labels: bool = False):
    """The run's test split (``x``, or ``(x, y)`` with ``labels``): saved with
    the run when it was small, else read from the run's data set (which must
    then be there)."""
    import os

    from pyrovae.checkpoint import checkpoint_path, load_test_split

    saved = load_test_split(os.path.dirname(checkpoint_path(run)))
    if saved is None:
        ds = datasets.load_from_config(cfg).subset(cfg.train_size, cfg.test_size)
        saved = ds.x_test, ds.y_test
    return saved if labels else saved[0]


def run_evaluate(args: argparse.Namespace) -> int:
    import json

    import pyro

    from pyrovae.checkpoint import load, load_checkpoint
    from pyrovae.evaluate.commands import check_likelihood, check_sample_flags, sample_quality
    from pyrovae.recipes import recipe_for

    check_likelihood(args, args.model)
    model, cfg = load(args.run, model=args.model, ema=args.ema, device=args.device)
    check_sample_flags(args, cfg, model)
    pyro.set_rng_seed(args.seed)
    recipe = recipe_for(cfg)
    if args.data is None:
        x_test, y_test = run_test_split(args.run, cfg, labels=True)
    else:
        ds = datasets.load_from_config(dataclasses.replace(cfg, data=args.data)).subset(cfg.train_size, cfg.test_size)
        datasets.run_spec(load_checkpoint(args.run), cfg).check_matches(ds.spec, f"data {args.data!r}")
        x_test, y_test = ds.x_test, ds.y_test
    x_test = recipe.prepare_test(cfg, x_test.to(next(model.parameters()).device))
    x_test = recipe.with_labels(cfg, x_test, y_test)  # M2: the test accuracy of q(y|x)
    result = recipe.run_evaluate(args, model, cfg, x_test)
    if args.samples:
        result.update(sample_quality(args, model, cfg, recipe))
    # the per-t terms go to the run's evaluate-<steps>.json, not the terminal
    shown = {k: v for k, v in result.items() if not isinstance(v, list)}
    print(json.dumps({"run": args.run, "test_size": len(x_test), **shown}))
    return 0


def one_line(err: BaseException) -> str:
    """The first line of an error's message: Pyro appends a table of the
    trace's shapes to an error raised inside a model, torch a hint or two."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def is_out_of_memory(err: BaseException) -> bool:
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text or "failed to allocate" in text


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning on the command line: one line ``pyrovae: warning: ...``, no source path."""
    print(f"pyrovae: warning: {one_line(message)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    commands = {"train": run_train, "sample": run_sample, "evaluate": run_evaluate, "bench": run_bench}
    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return commands[args.command](args)
    # OSError: unreadable or unwritable files, a full disk; FloatingPointError: a NaN loss (train.NonFiniteLossError).
    except (ValueError, TypeError, OSError, FloatingPointError) as err:
        if args.debug:
            raise
        line = one_line(err)
        more = " (--debug shows the rest)" if line != str(err).strip() else ""
        print(f"pyrovae: error: {line}{more}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        # torch's failed allocations (CPU or CUDA: torch.OutOfMemoryError is one) carry a C++ trace
        if args.debug or not is_out_of_memory(err):
            raise
        print(
            f"pyrovae: error: out of memory: {one_line(err)}; a smaller --batch-size, --test-particles, --chunk-size "
            "or --n needs less (--debug shows the rest)",
            file=sys.stderr,
        )
        return 1
    except TrainingInterrupted as err:
        print(f"pyrovae: {err}", file=sys.stderr)
        return 130  # 128 + SIGINT, as a shell reports a process stopped by Ctrl-C


if __name__ == "__main__":
    sys.exit(main())
