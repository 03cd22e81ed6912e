"""`gan-ddp` command line. Same entry point under `python -m gan_ddp`, `accelerate launch -m gan_ddp`
and `torchrun -m gan_ddp`.

`--help`, `--version` and a bad config answer without importing torch (well under a second): this module and
what it imports at the top are torch-free (`gan_ddp.choices` declares the config's values), and each command
imports its layer only when it runs (tests/test_cli.py checks `sys.modules`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gan_ddp.errors import UsageError
from gan_ddp.runtime import faults

EXIT_USAGE = 2  # also the exit code of every GanDdpError unless its class says otherwise (gan_ddp/errors.py)


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand of `gan-ddp`; the modules behind them expose plain functions."""
    from gan_ddp import __version__

    p = argparse.ArgumentParser(prog="gan-ddp", description="Distributed GAN training on MNIST with Accelerate.")
    p.add_argument("--version", action="version", version=f"gan-ddp {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a GAN (resumes the newest checkpoint in run.dir by default)")
    _add_config_args(t, "YAML file, e.g. configs/mnist_mlp.yaml")

    s = sub.add_parser("sample", help="generate images from a run's checkpoint")
    s.add_argument("--run", required=True, type=Path, help="run directory")
    s.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: newest complete one)")
    s.add_argument("--n", type=int, default=64, help="number of images")
    s.add_argument("--out", required=True, type=Path, help=".png (grid) or .npz (arr_0: uint8 N x 28 x 28 x 1)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-ema", action="store_true", help="use the raw generator instead of its EMA")
    s.add_argument("--batch", type=int, default=1000, help="images per forward pass")
    s.add_argument(
        "--digit",
        type=int,
        help="class-conditional runs: draw only this class (default: every class in turn, 0-9, 0-9, ...)",
    )

    pl = sub.add_parser("plot", help="draw plots/losses.png and plots/scores.png from metrics.jsonl")
    pl.add_argument("--run", required=True, type=Path)

    an = sub.add_parser("animate", help="write samples/progress.gif from the saved grids")
    an.add_argument("--run", required=True, type=Path)
    an.add_argument("--fps", type=int, default=4)

    it = sub.add_parser("interpolate", help="latent walks: sweep one dimension, or slerp between two seeds")
    it.add_argument("--run", required=True, type=Path)
    it.add_argument("--checkpoint", type=Path)
    it.add_argument("--out", required=True, type=Path, help="PNG grid")
    it.add_argument("--dim", type=int, default=0, help="latent dimension to sweep")
    it.add_argument("--range", type=float, nargs=2, default=(-3.0, 3.0), metavar=("LO", "HI"))
    it.add_argument("--steps", type=int, default=10, help="images per row")
    it.add_argument("--rows", type=int, default=8, help="rows (base noise vectors, or seed pairs)")
    it.add_argument("--between", type=int, nargs=2, metavar=("A", "B"), help="slerp from seed A to seed B")
    it.add_argument("--seed", type=int, default=0, help="seed of the sweep's base vectors")
    it.add_argument(
        "--digit", type=int, help="class-conditional runs: every row is this class (default: row i is class i %% 10)"
    )
    it.add_argument(
        "--classes",
        type=int,
        nargs=2,
        metavar=("A", "B"),
        help="class-conditional runs: fixed latent per row, the class moves from A to B",
    )
    it.add_argument("--no-ema", action="store_true")
    sub.add_parser(
        "doctor",
        help="what this machine can do: torch/CUDA/cuDNN, the build's GPU architectures, every GPU, "
        "precision, NCCL, launch command (exit 2 when a GPU cannot be used)",
    )
    ex = sub.add_parser(
        "export", help="write a run's generator as a Hugging Face Hub folder (safetensors, config.json, model card)"
    )
    ex.add_argument("--run", required=True, type=Path, help="run directory")
    ex.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: newest complete one)")
    ex.add_argument("--no-ema", action="store_true", help="export the raw generator instead of its EMA")
    ex.add_argument("--out", required=True, type=Path, help="new (or empty) folder to write")
    dm = sub.add_parser("demo", help="a local web page (Gradio) for a run's or an exported generator")
    src = dm.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="run directory (EMA and raw generator of a checkpoint)")
    src.add_argument("--model", type=Path, help="folder written by `gan-ddp export`")
    dm.add_argument("--checkpoint", type=Path, help="with --run: checkpoint directory (default: newest complete one)")
    dm.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    dm.add_argument("--port", type=int, default=7860)
    _add_eval_parsers(sub)
    _add_bench_parser(sub)
    _add_textbook_parser(sub)
    return p


def _add_eval_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``eval`` and ``train-evaluator`` subcommands (gan_ddp.evaluation.evaluate)."""
    from gan_ddp.config import EVALUATOR_EPOCHS

    e = sub.add_parser("eval", help="score samples: classifier FID, class coverage/entropy, confidence")
    what = e.add_mutually_exclusive_group(required=True)
    # The long aliases are for `torchrun ... -m gan_ddp eval`: torchrun's argparse reads abbreviations even
    # after the script name, and rejects --run (--run-path) and --n (--nnodes, ...) as ambiguous.
    what.add_argument("--run", "--run-dir", type=Path, help="run directory: generate --n samples from its checkpoint")
    what.add_argument("--samples", type=Path, help=".npz from `gan-ddp sample` (arr_0: uint8 N x 28 x 28 x 1)")
    e.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: newest complete one)")
    e.add_argument(
        "--all-checkpoints",
        action="store_true",
        help="with --run: score every complete checkpoint, oldest first, as a table of step, time_s and metrics",
    )
    e.add_argument("--n", "--num-samples", dest="n", type=int, default=10000, help="samples to generate (with --run)")
    e.add_argument("--no-ema", action="store_true", help="use the raw generator instead of its EMA")
    e.add_argument("--seed", type=int, default=0, help="noise seed (with --run)")
    e.add_argument("--batch", type=int, default=500, help="samples per generator forward")
    _add_data_args(e, "default: the run's data config, or mnist (test split, bundled) with --samples")
    _add_evaluator_arg(e)
    e.add_argument("--json", type=Path, help="also write the metrics to this JSON file")

    t = sub.add_parser("train-evaluator", help="train (or load) the cached classifier used by `eval`")
    _add_data_args(t, "default: mnist (test split, bundled)")
    _add_evaluator_arg(t)
    t.add_argument("--epochs", type=int, default=EVALUATOR_EPOCHS)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true", help="retrain even if a cached evaluator exists")


def _add_data_args(p: argparse.ArgumentParser, default_note: str) -> None:
    from gan_ddp.choices import DATASETS
    from gan_ddp.config import SPLITS

    p.add_argument("--dataset", choices=DATASETS.names(), help=default_note)
    p.add_argument("--root", help="folder with the IDX files, or 'bundled' (default for the MNIST test split)")
    p.add_argument("--split", choices=SPLITS, help="real data the evaluator and FID use")
    p.add_argument("--cache-dir", help="evaluator cache (default: $GAN_DDP_CACHE or ~/.cache/gan-ddp)")


def _add_evaluator_arg(p: argparse.ArgumentParser) -> None:
    from gan_ddp.choices import EVALUATORS

    p.add_argument(
        "--evaluator",
        choices=EVALUATORS.names(),
        default="cnn",
        help="feature network: cnn (default) or mlp, a second classifier sharing nothing with it",
    )


def _add_config_args(p: argparse.ArgumentParser, config_help: str) -> None:
    """`--config FILE` and the dotted overrides that every training-like command takes."""
    p.add_argument("--config", required=True, help=config_help)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200 data.root=bundled")


def _add_bench_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`bench` (gan_ddp.tools.bench)."""
    b = sub.add_parser(
        "bench",
        help="measure the training step (images/s, time split, memory, checkpoint save); --baseline compares "
        "with a textbook PyTorch loop",
    )
    _add_config_args(b, "YAML file, e.g. configs/mnist_mlp.yaml")
    b.add_argument("--baseline", action="store_true", help="also time the textbook loop on the same model and batch")
    b.add_argument("--json", type=Path, help="write every figure to this file (one flat JSON object)")
    b.add_argument("--warmup", type=int, default=20, help="iterations before timing (default 20)")
    b.add_argument("--iters", type=int, default=100, help="timed iterations per window (default 100)")
    b.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="timed windows, lean and baseline alternating; the median window is reported (default 1)",
    )
    return b


def _add_textbook_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """`textbook` (gan_ddp.tools.textbook)."""
    t = sub.add_parser(
        "textbook",
        help="train the tutorials' loop (bench's --baseline) for a time budget, writing sample files for "
        "`gan-ddp eval --samples`: the reference for sample quality per unit of time",
    )
    _add_config_args(t, "YAML file: model, optimiser, batch and data are taken from it")
    t.add_argument("--seconds", type=float, required=True, help="training budget, wall seconds (data loading counts)")
    t.add_argument("--every", type=float, default=60.0, help="write samples every this many training seconds")
    t.add_argument("--n", "--num-samples", dest="n", type=int, default=10000, help="samples per file")
    t.add_argument("--out", type=Path, required=True, help="folder for tNNNNN.npz files and log.jsonl")
    return t


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise UsageError(f"{name} must be > 0, got {value}")


def cmd_train(args: argparse.Namespace) -> int:
    from gan_ddp.config import load_config

    cfg = load_config(args.config, args.overrides)  # torch-free: a bad config is one line, at once
    from gan_ddp.runtime.distributed import main_process_warnings_only

    main_process_warnings_only()  # before Accelerate and the trainer are imported: they warn too
    from gan_ddp.runtime.tracking import check_installed
    from gan_ddp.training.trainer import Trainer

    check_installed(cfg.log.trackers)  # before any process starts working: one line naming the package
    return Trainer(cfg).train()


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    from torchvision.utils import save_image

    from gan_ddp.components.data import to_sample_array
    from gan_ddp.components.models import N_CLASSES, generate
    from gan_ddp.components.rundir import load_generator_from_run

    _positive("--n", args.n)
    _positive("--batch", args.batch)
    if args.out.suffix not in (".png", ".npz"):
        raise UsageError(f"--out {args.out}: use a .png (grid) or .npz (array) file name")
    G, cfg, checkpoint = load_generator_from_run(args.run, args.checkpoint, use_ema=not args.no_ema)
    labels = _requested_labels(cfg.model.conditional, args.digit, args.n)
    images = generate(G, args.n, cfg.model.z_dim, args.seed, args.batch, labels)  # (N, 1, 28, 28) in [-1, 1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".npz":
        np.savez(args.out, to_sample_array(images))
    else:
        # Conditional, every class: 10 columns, so each column holds one class.
        nrow = N_CLASSES if labels is not None and args.digit is None else max(1, int(args.n**0.5))
        save_image(images, args.out, nrow=nrow, normalize=True, value_range=(-1, 1))
    what = "" if labels is None else (f" of digit {args.digit}" if args.digit is not None else ", classes 0-9 in turn")
    print(f"wrote {args.n} samples{what} from {checkpoint} to {args.out}")
    return 0


def _requested_labels(conditional: bool, digit: int | None, n: int):
    """Labels for a conditional run's samples: all `digit`, or class-balanced; None for an unconditional run."""
    import torch

    from gan_ddp.components.models import N_CLASSES, balanced_labels

    if not conditional:
        if digit is not None:
            raise UsageError("--digit needs a class-conditional run (model.conditional: true); this one is not")
        return None
    if digit is None:
        return balanced_labels(n)
    if not 0 <= digit < N_CLASSES:
        raise UsageError(f"--digit must be in [0, {N_CLASSES}), got {digit}")
    return torch.full((n,), digit, dtype=torch.long)


def cmd_plot(args: argparse.Namespace) -> int:
    from gan_ddp.components import viz

    for path in viz.plot_metrics(args.run):
        print(f"wrote {path}")
    return 0


def cmd_animate(args: argparse.Namespace) -> int:
    from gan_ddp.components import viz

    print(f"wrote {viz.make_animation(args.run, fps=args.fps)}")
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    import torch

    from gan_ddp.components import viz
    from gan_ddp.components.models import N_CLASSES
    from gan_ddp.components.rundir import load_generator_from_run

    _positive("--steps", args.steps)
    _positive("--rows", args.rows)
    G, cfg, _ = load_generator_from_run(args.run, args.checkpoint, use_ema=not args.no_ema)
    conditional = cfg.model.conditional
    if args.classes and not conditional:
        raise UsageError("--classes needs a class-conditional run (model.conditional: true); this one is not")
    if args.classes and (args.between or args.digit is not None):
        raise UsageError("--classes goes without --between and --digit")
    labels = None
    if conditional and args.digit is not None:
        labels = _requested_labels(True, args.digit, args.rows)
    elif conditional:
        labels = torch.arange(args.rows) % N_CLASSES  # row i: class i mod 10
    elif args.digit is not None:
        _requested_labels(False, args.digit, args.rows)  # the one-line refusal
    if args.classes:
        images = viz.class_between(G, args.classes[0], args.classes[1], args.steps, rows=args.rows, seed=args.seed)
    elif args.between:
        images = viz.latent_between(G, args.between[0], args.between[1], args.steps, rows=args.rows, labels=labels)
    else:
        images = viz.latent_sweep(
            G, args.dim, args.range[0], args.range[1], args.steps, rows=args.rows, seed=args.seed, labels=labels
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viz.save_grid(images, args.out, nrow=args.steps)
    print(f"wrote {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from gan_ddp.tools.export import export_run

    checkpoint = export_run(args.run, args.out, args.checkpoint, use_ema=not args.no_ema)
    print(f"wrote {args.out} from {checkpoint}: load it with from_pretrained({str(args.out)!r}), see its README.md")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gan_ddp.tools import demo

    if args.checkpoint and args.model:
        raise UsageError("--checkpoint goes with --run, not --model (an exported folder holds one generator)")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    demo.check_gradio()
    model = demo.from_run(args.run, args.checkpoint) if args.run else demo.from_export(args.model)
    demo.serve(model, args.host, args.port)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gan_ddp.evaluation.evaluate import run_eval

    return run_eval(args)


def cmd_train_evaluator(args: argparse.Namespace) -> int:
    from gan_ddp.evaluation.evaluate import run_train_evaluator

    return run_train_evaluator(args)


def cmd_doctor(args: argparse.Namespace) -> int:
    from gan_ddp.runtime.doctor import run_doctor

    return run_doctor()


def cmd_bench(args: argparse.Namespace) -> int:
    from gan_ddp.tools.bench import run_bench

    return run_bench(args)


def cmd_textbook(args: argparse.Namespace) -> int:
    from gan_ddp.tools.textbook import run_textbook

    return run_textbook(args)


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "plot": cmd_plot,
    "animate": cmd_animate,
    "interpolate": cmd_interpolate,
    "export": cmd_export,
    "demo": cmd_demo,
    "eval": cmd_eval,
    "train-evaluator": cmd_train_evaluator,
    "bench": cmd_bench,
    "doctor": cmd_doctor,
    "textbook": cmd_textbook,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting `key=value` positionals at the first flag; accept them after flags too.
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") or "=" not in e for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from gan_ddp.errors import GanDdpError

    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one outside it
        if faults.after_stop_checkpoint():  # while shutting down after the stop checkpoint: nothing is lost
            print(f"error: {faults.STOPPED_AGAIN_LINE}", file=sys.stderr)
            return faults.EXIT_PREEMPTED
        print(f"error: {faults.INTERRUPTED_LINE}", file=sys.stderr)
        return faults.EXIT_INTERRUPTED
    except GanDdpError as exc:  # every failure the user can act on: one line, the class's exit code
        if not faults.is_echo(exc):
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        known = faults.describe(exc)  # divergence, run.dir in use, I/O errors, lost or stalled processes
        if known is None:
            raise
        if not faults.is_echo(exc):
            print(f"error: {known[1]}", file=sys.stderr)
        return known[0]


def _one_of_many() -> bool:
    """This process is one of a multi-process launch and has loaded torch.distributed (torch-free commands,
    `--help` among them, never import it here)."""
    if "torch.distributed" not in sys.modules:
        return False
    from gan_ddp.runtime.distributed import launched_world_size

    return launched_world_size() > 1


def entry() -> None:
    """`gan-ddp` and `python -m gan_ddp`: `main()`, then the exit. A process of a multi-process launch leaves
    through `distributed.leave_process`: gloo's worker threads can abort the interpreter's own teardown after a
    run that finished well (the comment above leave_process says how)."""
    try:
        code = main()
    except SystemExit:  # argparse's --help, --version and usage errors: torch-free, nothing to tear down
        raise
    except BaseException:  # a bug: the traceback as the interpreter prints it, then the same exit as below
        if not _one_of_many():
            raise
        sys.excepthook(*sys.exc_info())
        code = 1
    if _one_of_many() or code == faults.EXIT_PREEMPTED:
        # Also after a stop checkpoint: the interpreter's teardown puts SIGINT back to its default action, and a
        # launcher's relayed Ctrl-C landing there would end the process by the signal instead of with 75.
        from gan_ddp.runtime.distributed import leave_process

        leave_process(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
