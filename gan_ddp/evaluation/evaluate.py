"""Scoring a generator or a file of samples: what joins the evaluator, the metrics and the processes.

Reading order: `prepare_evaluation` (evaluator and real statistics on every process), `generate_features`
(generation split over processes), `score_generator` / `score_npz`, then the plain functions the
`eval` and `train-evaluator` commands call (their arguments are parsed in `gan_ddp.commands.cli`). The network and its
cache are in `gan_ddp.evaluation.evaluator`, the metrics and the real statistics in `gan_ddp.evaluation.eval_metrics`.

Numbers are only comparable between runs scored with the same evaluator (same cached file) and the
same reference statistics: both are keyed by the sha256 of the data they come from. Generation for scoring
is split over processes by global sample index, so every process count gives the same samples, features
and numbers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gan_ddp.components.data import DataError, default_root
from gan_ddp.components.models import N_CLASSES, balanced_labels
from gan_ddp.errors import UsageError, one_line
from gan_ddp.evaluation.eval_metrics import (
    CONDITIONAL_KEYS,
    METRIC_KEYS,
    RealStats,
    extract_features,
    load_or_compute_real_stats,
    metrics_against,
)
from gan_ddp.evaluation.evaluator import (
    MnistEvaluator,
    RealData,
    default_cache_dir,
    evaluator_path,
    load_or_train_evaluator,
)
from gan_ddp.evaluation.fidelity import MIN_SAMPLES
from gan_ddp.runtime.barrier import main_first
from gan_ddp.runtime.distributed import check_consistency, unwrap


# ------------------------------------------------------------------------------ set-up, samples from a file
def prepare_evaluation(
    accelerator: Any,
    real: RealData,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = print,
    kind: str = "cnn",
) -> tuple[MnistEvaluator, RealStats]:
    """All processes: the evaluator (on ``accelerator.device``) and the statistics of the ``real`` images.

    The main process trains / computes and caches first; the others then load its files.
    """
    with main_first(accelerator.main_process_first):
        evaluator, _ = load_or_train_evaluator(
            real, cache_dir, log=log if accelerator.is_main_process else None, kind=kind
        )
        stats = load_or_compute_real_stats(evaluator, real, cache_dir)
    return evaluator.to(accelerator.device), stats


def evaluate_samples(
    evaluator: MnistEvaluator, images: Tensor | np.ndarray, real_stats: RealStats, batch: int = 500
) -> dict[str, float | int]:
    """Metrics of a batch of images: uint8 [0, 255] or float [-1, 1]; (N, 28, 28), (N, 1, 28, 28) or NHWC."""
    features, probs = extract_features(evaluator, images, batch)
    return metrics_against(features, probs, real_stats)


def read_samples_npz(path: str | Path) -> np.ndarray:
    """``arr_0`` of a ``gan-ddp sample --out FILE.npz`` file, uint8 (N, 28, 28, 1), N >= 2; DataError naming the
    file otherwise. Read without pickles (`allow_pickle=False`): an object array is refused, never unpickled."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "arr_0" not in npz.files:
                raise DataError(
                    f"{path}: no arr_0 array (found {', '.join(npz.files) or 'none'}); expected uint8 (N, 28, 28, 1)"
                )
            array = npz["arr_0"]
    except DataError:
        raise
    except Exception as exc:  # a parser of foreign bytes: zipfile, zlib, numpy's header (ast), short reads
        why = one_line(exc)[:200]
        if "pickle" in why:  # numpy's advice ("if you trust the file ... allow_pickle") is not ours to give
            why = "neither a zip of arrays nor an array: numpy would read it as a pickle, which is never loaded"
        raise DataError(f"{path}: not a readable .npz file ({why})") from None
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (28, 28, 1) or array.shape[0] < 2:
        raise DataError(
            f"{path}: arr_0 is {array.dtype} {tuple(array.shape)}; expected uint8 (N, 28, 28, 1) with N >= 2 "
            "(the format `gan-ddp sample --out FILE.npz` writes)"
        )
    return array


def score_npz(path: str | Path, evaluator: MnistEvaluator, real_stats: RealStats) -> dict[str, float | int]:
    """Metrics of a ``gan-ddp sample --out FILE.npz`` file: ``arr_0`` uint8 (N, 28, 28, 1), N >= 2."""
    return evaluate_samples(evaluator, read_samples_npz(path), real_stats)


# ------------------------------------------------------------------------------ generation, distributed
def chunk_noise(seed: int, chunk: int, size: int, z_dim: int) -> Tensor:
    """The noise of one chunk of the global sample range, (size, z_dim) on CPU: a function of (seed, chunk)."""
    state = np.random.SeedSequence([seed, chunk]).generate_state(2, np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(size, z_dim, generator=gen)


@torch.no_grad()
def generate_features(
    accelerator: Any,
    G: nn.Module,
    evaluator: MnistEvaluator,
    n: int,
    z_dim: int,
    seed: int,
    batch: int = 500,
    conditional: bool = False,
) -> tuple[Tensor, Tensor]:
    """All processes: features (n, F) and class probabilities (n, 10) of n generated samples, on every rank.
    A ``conditional`` G is asked for class i mod 10 for global sample i (`models.balanced_labels`).

    Samples are cut into chunks of ``batch`` global indices; chunk c's noise is ``chunk_noise(seed, c)``
    and process r generates chunks r, r + W, r + 2W, ... So the samples (and the numbers) depend on
    (seed, n, batch) but not on the number of processes. Each rank fills a fixed-size buffer (short or
    missing chunks are padded and tagged with index -1); after one gather, rows are put in global order
    and checked to be exactly 0..n-1. Pass the unwrapped generator (the EMA one, usually); it is used in
    eval mode and must be identical on all ranks (checked).
    """
    if n < 1 or batch < 1:
        raise ValueError(f"need n >= 1 and batch >= 1, got n={n}, batch={batch}")
    G = unwrap(accelerator, G)
    # Every process generates its own share, so their generators must agree bit for bit.
    check_consistency(
        accelerator, {"G": G}, step=None, hint=" (evaluation: average BatchNorm buffers over processes before scoring)"
    )
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    evaluator = evaluator.to(device).eval()
    g_device = next(G.parameters()).device
    n_chunks = math.ceil(n / batch)
    rounds = math.ceil(n_chunks / world)
    feats = torch.zeros(rounds * batch, evaluator.feature_dim, device=device)
    probs = torch.zeros(rounds * batch, N_CLASSES, device=device)
    index = torch.full((rounds * batch,), -1, dtype=torch.long, device=device)
    was_training = G.training
    G.eval()
    try:
        for k in range(rounds):
            chunk = k * world + rank
            if chunk >= n_chunks:
                continue  # this rank has one chunk fewer: its slot stays padding
            start = chunk * batch
            size = min(batch, n - start)
            z = chunk_noise(seed, chunk, size, z_dim).to(g_device)
            y = balanced_labels(n)[start : start + size].to(g_device) if conditional else None
            images = (G(z) if y is None else G(z, y)).float().to(device)  # (size, 1, 28, 28)
            f = evaluator.features(images.clamp(-1, 1))
            rows = slice(k * batch, k * batch + size)
            feats[rows] = f.float()
            probs[rows] = evaluator.head(f).float().softmax(1)
            index[rows] = torch.arange(start, start + size, device=device)
    finally:
        G.train(was_training)
    all_index = accelerator.gather(index)  # (world * rounds * batch,)
    all_feats = accelerator.gather(feats)
    all_probs = accelerator.gather(probs)
    keep = all_index >= 0
    order = all_index[keep].argsort()
    got = all_index[keep][order]
    if got.numel() != n or not bool((got == torch.arange(n, device=got.device)).all()):
        raise RuntimeError(f"evaluation gathered {got.numel()} samples for n={n}: duplicates or missing indices")
    return all_feats[keep][order].cpu(), all_probs[keep][order].cpu()


def score_generator(
    accelerator: Any,
    G: nn.Module,
    evaluator: MnistEvaluator,
    real_stats: RealStats,
    n: int,
    z_dim: int,
    seed: int,
    batch: int = 500,
    conditional: bool = False,
) -> dict[str, float | int]:
    """All processes: the ``eval/*`` metrics of n samples of G; the same dict on every rank. A ``conditional``
    G is asked for every class in turn, and scored on agreement and per-class FID too."""
    features, probs = generate_features(accelerator, G, evaluator, n, z_dim, seed, batch, conditional)
    requested = balanced_labels(n) if conditional else None
    return metrics_against(features, probs, real_stats, requested)


# --------------------------------------------------------------------------- commands (arguments: gan_ddp.commands.cli)
def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in rows:
        table.add_row(key, value)
    Console(highlight=False).print(table)


def _format(value: float | int) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.3e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"  # KID is often below 1e-3


def run_eval(args: Any) -> int:
    """``gan-ddp eval``: works under ``torchrun``/``accelerate launch`` too (generation is split over ranks)."""
    if args.n < MIN_SAMPLES or args.batch < 1:
        raise UsageError(f"--n must be >= {MIN_SAMPLES} and --batch >= 1, got {args.n} and {args.batch}")
    if args.all_checkpoints and (args.run is None or args.checkpoint is not None):
        raise UsageError("--all-checkpoints goes with --run and without --checkpoint")
    if args.all_checkpoints:
        return _eval_all_checkpoints(args)
    if args.samples is not None:
        samples = read_samples_npz(args.samples)  # a bad file is refused before minutes of evaluator training
        real = _command_line_data(args)
        evaluator, info = load_or_train_evaluator(real, args.cache_dir, kind=args.evaluator)
        stats = load_or_compute_real_stats(evaluator, real, args.cache_dir)
        metrics = evaluate_samples(evaluator, samples, stats)
        source, is_main = str(args.samples), True
    else:
        from gan_ddp.components.rundir import load_generator_from_run
        from gan_ddp.runtime.distributed import check_distributed, make_accelerator

        G, cfg, checkpoint = load_generator_from_run(args.run, args.checkpoint, use_ema=not args.no_ema)
        accelerator = make_accelerator("no")
        check_distributed(accelerator.num_processes)
        real = _real_data(args, cfg)
        evaluator, stats = prepare_evaluation(accelerator, real, args.cache_dir, kind=args.evaluator)
        info = evaluator.info
        metrics = _score_run_generator(accelerator, G, cfg, evaluator, stats, args)
        source = f"{checkpoint} ({'raw G' if args.no_ema else 'EMA G if saved'}, seed {args.seed})"
        is_main = accelerator.is_main_process
    if is_main:
        rows = [(k.split("/", 1)[1], _format(metrics[k])) for k in (*METRIC_KEYS, *CONDITIONAL_KEYS) if k in metrics]
        rows += [
            (f"{name} {c}", _format(metrics[f"eval/{name}/{c}"]))
            for name in ("fid_class", "agreement_class")
            for c in range(N_CLASSES)
            if f"eval/{name}/{c}" in metrics
        ]
        rows += [
            ("samples", source),
            ("real data", f"{real.dataset}/{real.split} ({stats.n} images)"),
            ("evaluator", f"{info.arch}, held-out accuracy {info.heldout_accuracy:.2%}"),
        ]
        _print_table("eval", rows)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({**metrics, "source": source, "evaluator": info.arch}, indent=2) + "\n")
    return 0


def _real_data(args: Any, cfg: Any) -> RealData:
    """The real images of ``eval --run``, read once: the command line's, else the run's own data."""
    return RealData.load(args.dataset or cfg.data.dataset, args.root or cfg.data.root, args.split or cfg.data.split)


def _command_line_data(args: Any) -> RealData:
    """The real images of ``eval --samples`` and ``train-evaluator``, read once: mnist / its default root / test."""
    dataset, split = args.dataset or "mnist", args.split or "test"
    return RealData.load(dataset, args.root or default_root(dataset, split), split)


def _score_run_generator(accelerator: Any, G: Any, cfg: Any, evaluator: Any, stats: Any, args: Any) -> dict:
    """`eval --run`: the run's generator scored on --n samples of noise seed --seed (all ranks)."""
    return score_generator(
        accelerator,
        G.to(accelerator.device),
        evaluator,
        stats,
        args.n,
        cfg.model.z_dim,
        args.seed,
        args.batch,
        conditional=cfg.model.conditional,
    )


def _eval_all_checkpoints(args: Any) -> int:
    """``eval --run DIR --all-checkpoints``: the curve of a run, from its kept checkpoints (set
    ``checkpoint.keep`` high enough when training). ``time_s`` is the run's training time at the checkpoint."""
    from gan_ddp.components.rundir import load_generator_from_run
    from gan_ddp.runtime import checkpoint as ckpt
    from gan_ddp.runtime.distributed import check_distributed, make_accelerator

    accelerator = make_accelerator("no")
    check_distributed(accelerator.num_processes)
    rows: list[dict[str, Any]] = []
    evaluator = stats = None
    for directory in ckpt.list_checkpoints(args.run / "checkpoints"):
        try:
            G, cfg, _ = load_generator_from_run(args.run, directory, use_ema=not args.no_ema)
        except ckpt.CheckpointError as exc:
            if accelerator.is_main_process:
                print(f"skipping checkpoint: {exc}")
            continue
        if evaluator is None:
            evaluator, stats = prepare_evaluation(
                accelerator, _real_data(args, cfg), args.cache_dir, kind=args.evaluator
            )
        metrics = _score_run_generator(accelerator, G, cfg, evaluator, stats, args)
        state = ckpt.read_state(directory)
        rows.append({"step": state["step"], "time_s": state.get("time_s"), "checkpoint": directory.name, **metrics})
    if not rows:
        raise ckpt.CheckpointError(f"{args.run}: no complete checkpoint under checkpoints/")
    if accelerator.is_main_process:
        from rich.console import Console
        from rich.table import Table

        assert evaluator is not None and evaluator.info is not None
        table = Table(title=f"{args.run} ({evaluator.info.arch}, {args.n} samples)", title_justify="left")
        keys = [k for k in (*METRIC_KEYS[:-1], *CONDITIONAL_KEYS) if any(k in row for row in rows)]
        for column in ("step", "time_s", *(k.split("/")[1] for k in keys)):
            table.add_column(column, justify="right")
        for row in rows:
            time_s = "-" if row["time_s"] is None else f"{row['time_s']:.0f}"
            table.add_row(str(row["step"]), time_s, *(_format(row[k]) if k in row else "-" for k in keys))
        console = Console(highlight=False)
        if not console.is_terminal:  # logs and pipes: room for every column instead of 80 characters
            console.width = 240
        console.print(table)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"evaluator": evaluator.info.arch, "rows": rows}, indent=2) + "\n")
    return 0


def run_train_evaluator(args: Any) -> int:
    """``gan-ddp train-evaluator``: train (or load) and show the evaluator's card."""
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    real = _command_line_data(args)
    _, info = load_or_train_evaluator(
        real, args.cache_dir, seed=args.seed, epochs=args.epochs, force=args.force, kind=args.evaluator
    )
    path = evaluator_path(args.cache_dir or default_cache_dir(), real.dataset, info.data_sha256, args.evaluator)
    rows = [
        ("file", str(path)),
        ("architecture", info.arch),
        ("data", f"{real.dataset}/{real.split} sha256 {info.data_sha256[:12]}"),
        ("train / held out", f"{info.n_train} / {info.n_heldout} ({info.heldout})"),
        ("held-out accuracy", f"{info.heldout_accuracy:.2%}"),
        ("epochs, seed", f"{info.epochs}, {info.seed}"),
        ("training time", f"{info.train_seconds:.0f} s"),
    ]
    _print_table("evaluator", rows)
    return 0
