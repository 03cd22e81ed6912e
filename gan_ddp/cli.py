"""`gan-ddp` command line. Same entry point under `python -m gan_ddp`, `accelerate launch -m gan_ddp`
and `torchrun -m gan_ddp`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2

# Errors a user can fix: printed as one `error:` line, exit code 2, no traceback.
USER_ERRORS = ("ConfigError", "DataError", "CheckpointError", "DistributedSetupError", "FileNotFoundError")
# Not the user's doing, but one line says it better than a traceback from every rank.
ONE_LINE_ERRORS = (*USER_ERRORS, "ConsistencyError")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gan-ddp", description="Distributed GAN training on MNIST with Accelerate.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a GAN (resumes the newest checkpoint in run.dir by default)")
    t.add_argument("--config", required=True, help="YAML file, e.g. configs/mnist_mlp.yaml")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=200 run.dir=/tmp/r")

    s = sub.add_parser("sample", help="generate images from a run's checkpoint")
    s.add_argument("--run", required=True, type=Path, help="run directory")
    s.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: newest complete one)")
    s.add_argument("--n", type=int, default=64, help="number of images")
    s.add_argument("--out", required=True, type=Path, help=".png (grid) or .npz (arr_0: uint8 N x 28 x 28 x 1)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-ema", action="store_true", help="use the raw generator instead of its EMA")
    s.add_argument("--batch", type=int, default=1000, help="images per forward pass")

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
    it.add_argument("--no-ema", action="store_true")
    from gan_ddp.bench import add_bench_parser, add_textbook_parser
    from gan_ddp.evaluate import add_eval_parsers

    add_eval_parsers(sub)
    add_bench_parser(sub)
    add_textbook_parser(sub)
    return p


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def cmd_train(args: argparse.Namespace) -> int:
    from gan_ddp.distributed import main_process_warnings_only

    main_process_warnings_only()  # before Accelerate and the trainer are imported: they warn too
    from gan_ddp.config import load_config
    from gan_ddp.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    return Trainer(cfg).train()


def cmd_sample(args: argparse.Namespace) -> int:
    import numpy as np
    from torchvision.utils import save_image

    from gan_ddp.data import to_sample_array
    from gan_ddp.models import generate
    from gan_ddp.trainer import load_generator_from_run

    _positive("--n", args.n)
    _positive("--batch", args.batch)
    if args.out.suffix not in (".png", ".npz"):
        raise ValueError(f"--out {args.out}: use a .png (grid) or .npz (array) file name")
    G, cfg, checkpoint = load_generator_from_run(args.run, args.checkpoint, use_ema=not args.no_ema)
    images = generate(G, args.n, cfg.model.z_dim, args.seed, args.batch)  # (N, 1, 28, 28) in [-1, 1]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".npz":
        np.savez(args.out, to_sample_array(images))
    else:
        save_image(images, args.out, nrow=max(1, int(args.n**0.5)), normalize=True, value_range=(-1, 1))
    print(f"wrote {args.n} samples from {checkpoint} to {args.out}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from gan_ddp import viz

    for path in viz.plot_metrics(args.run):
        print(f"wrote {path}")
    return 0


def cmd_animate(args: argparse.Namespace) -> int:
    from gan_ddp import viz

    print(f"wrote {viz.make_animation(args.run, fps=args.fps)}")
    return 0


def cmd_interpolate(args: argparse.Namespace) -> int:
    from gan_ddp import viz
    from gan_ddp.trainer import load_generator_from_run

    _positive("--steps", args.steps)
    _positive("--rows", args.rows)
    G, _, _ = load_generator_from_run(args.run, args.checkpoint, use_ema=not args.no_ema)
    if args.between:
        images = viz.latent_between(G, args.between[0], args.between[1], args.steps, rows=args.rows)
    else:
        images = viz.latent_sweep(G, args.dim, args.range[0], args.range[1], args.steps, rows=args.rows, seed=args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viz.save_grid(images, args.out, nrow=args.steps)
    print(f"wrote {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from gan_ddp.evaluate import run_eval

    return run_eval(args)


def cmd_train_evaluator(args: argparse.Namespace) -> int:
    from gan_ddp.evaluate import run_train_evaluator

    return run_train_evaluator(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from gan_ddp.bench import run_bench

    return run_bench(args)


def cmd_textbook(args: argparse.Namespace) -> int:
    from gan_ddp.bench import run_textbook

    return run_textbook(args)


COMMANDS = {
    "train": cmd_train,
    "sample": cmd_sample,
    "plot": cmd_plot,
    "animate": cmd_animate,
    "interpolate": cmd_interpolate,
    "eval": cmd_eval,
    "train-evaluator": cmd_train_evaluator,
    "bench": cmd_bench,
    "textbook": cmd_textbook,
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting `key=value` positionals at the first flag; accept them after flags too.
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") or "=" not in e for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command](args)
    except Exception as exc:
        if type(exc).__name__ in ONE_LINE_ERRORS or type(exc) is ValueError:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":
    sys.exit(main())
