"""The set-up of a training run: `build(cfg)` makes the `Parts` the loop wires, in the order they are made.

The order: the GPU-kernel check, the precision, the Accelerator (and with it the process group), the run
directory's lock (before anything reads or writes run.dir), threads, data, models (identical on every rank),
EMA, optimisers, torch.compile, Accelerate's `prepare`, the per-rank seed, the evaluator, the grids' fixed
inputs and the augmentation. Every rank runs all of it (the collectives inside: the lock's outcome, the data
checksum, the evaluator's cache); a failure after the lock gives the lock back, for in-process callers (tests,
notebooks). Nothing here trains, and nothing here imports the loop (`trainer`) or the components built on it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gan_ddp.components.augment import DiffAugment
from gan_ddp.components.data import BUNDLED, DataError, DataInfo, ImageTensorDataset, load_data, make_train_loader
from gan_ddp.components.models import N_CLASSES, build_models, class_grid_inputs, count_parameters
from gan_ddp.components.selfcond import Clusterer
from gan_ddp.config import Config, ConfigError
from gan_ddp.runtime import compat, runlock
from gan_ddp.runtime.console import TrainingConsole
from gan_ddp.runtime.distributed import (
    announce_host,
    check_distributed,
    choose_precision,
    cpu_has_native_bf16,
    local_world_size,
    make_accelerator,
    want_cpu,
)
from gan_ddp.runtime.doctor import check_gpu_kernels
from gan_ddp.training.ema import GeneratorEMA


@dataclass
class Parts:
    """What a training run is made of; `build` fills it top to bottom."""

    cfg: Config
    created: float  # time.monotonic() before anything: train.max_seconds counts set-up too, as a job's limit does
    precision: str  # "no", "bf16" or "fp16"
    precision_reason: str
    accelerator: Any  # accelerate.Accelerator
    world: int
    rank: int
    device: torch.device
    is_main: bool
    console: TrainingConsole
    run_dir: Path
    run_lock: runlock.RunLock | None  # held by the main process until `train` ends
    threads: int  # torch intra-op threads per process
    local_batch: int  # this process's share of train.batch_size
    data_info: DataInfo  # what the run trains on (recorded in config.yaml and every checkpoint)
    images: torch.Tensor  # (N, 28, 28) uint8, on the host
    labels: torch.Tensor  # (N,) int64
    loader: Any  # Accelerate's prepared loader of this rank's shard
    steps_per_epoch: int
    total_steps: int
    G: torch.nn.Module  # DDP-wrapped (and compiled) where that applies; G_raw / D_raw: unwrapped
    D: torch.nn.Module
    G_raw: torch.nn.Module
    D_raw: torch.nn.Module
    opt_g: Any  # Accelerate's wrapped optimisers; `.optimizer` is torch's
    opt_d: Any
    ema: GeneratorEMA | None
    n_params: tuple[int, int]  # G, D
    cuda_graphs: bool  # train.compile_mode=reduce-overhead: CUDA graphs replay the step
    evaluator: Any  # None unless eval.every
    real_stats: Any
    fixed_noise: torch.Tensor  # the grids' inputs: (n, z_dim) on the device
    fixed_labels: torch.Tensor | None  # (n,) classes of a conditional model's grid rows
    augment: DiffAugment
    clusterer: Clusterer | None  # model.clusters: re-clusters D's features of real images (selfcond.*)


def resolve_precision(requested: str) -> tuple[str, str]:
    if want_cpu():
        return choose_precision(requested, "cpu", cpu_has_bf16=cpu_has_native_bf16())
    return choose_precision(requested, "cuda", capability=torch.cuda.get_device_capability())


def compile_models(G: torch.nn.Module, D: torch.nn.Module, mode: str, device_type: str):
    """torch.compile G and D; `reduce-overhead` also replays them as CUDA graphs (no launch overhead)."""
    why_not = compat.compile_unsupported()
    if why_not:
        raise ConfigError(f"train.compile: {why_not}; set train.compile=false")
    if mode == "reduce-overhead" and device_type != "cuda":
        raise ConfigError(
            "train.compile_mode: reduce-overhead captures CUDA graphs and needs a GPU; on CPU use "
            "train.compile_mode=default (or train.compile=false)"
        )
    return torch.compile(G, mode=mode), torch.compile(D, mode=mode)


def build(cfg: Config) -> Parts:
    """Every process builds the same run (collective): see the module docstring for the order."""
    created = time.monotonic()
    check_gpu_kernels()  # a GPU this torch build has no kernels for: one line now, not a crash mid-run
    precision, reason = resolve_precision(cfg.train.precision)
    acc = make_accelerator(precision, timeout_s=cfg.train.collective_timeout_s)
    check_distributed(acc.num_processes)
    world, rank = acc.num_processes, acc.process_index
    if world > 1:  # for the error line that names a lost process (distributed.lost_peers)
        announce_host(rank)
    console = TrainingConsole(enabled=acc.is_main_process)
    run_dir = Path(cfg.run.dir)
    lock = lock_run_dir(run_dir, acc.is_main_process, world, console)  # before anything reads or writes run.dir
    try:
        return _build(cfg, created, precision, reason, acc, console, run_dir, lock)
    except BaseException:  # in-process callers (tests, notebooks) get the lock back too
        if lock is not None:
            lock.release()
        raise


def _build(cfg, created, precision, reason, acc, console, run_dir, lock) -> Parts:
    world, rank, device = acc.num_processes, acc.process_index, acc.device
    if device.type == "cpu":
        # Processes sharing a machine split its cores; oversubscription costs more than it gains.
        torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // local_world_size()))
    threads = torch.get_num_threads()
    B = cfg.train.batch_size
    if B % world:
        error = ConfigError(
            f"train.batch_size: {B} does not divide by the {world} processes; use a multiple of {world}"
        )
        error.all_ranks = True  # every rank finds it: printed once, by rank 0 (faults.is_echo)
        raise error
    local_batch = B // world
    if cfg.loss.mode_seeking and local_batch % 2:
        error = ConfigError(
            f"loss.mode_seeking: pairs samples within each process, but train.batch_size {B} over {world} "
            f"processes gives {local_batch} each; use a batch size that gives an even number per process"
        )
        error.all_ranks = True
        raise error

    # Data: every rank holds the uint8 tensor once (47 MB for MNIST train); batches are single index ops.
    images, labels, data_info = load_data(
        cfg.data.dataset,
        cfg.data.root,
        cfg.data.split,
        cfg.data.download,
        fallback=cfg.data.fallback == "bundled",
        main_process_first=acc.main_process_first,
        note=console.print,
    )
    if data_info.root == BUNDLED:
        # config.yaml, W&B and evaluation then name the data the run really trains on.
        cfg.data.root, cfg.data.split = BUNDLED, "test"
    check_same_data(acc, data_info, rank)
    if len(images) < B:
        raise ConfigError(f"train.batch_size: {B} is larger than the dataset ({len(images)} images)")
    dataset = ImageTensorDataset(images, labels)
    if device.type == "cuda":
        dataset = dataset.to(device)  # resident on the GPU: no host-to-device copy per step
    loader = make_train_loader(dataset, B, local_batch, cfg.seed, cfg.data.num_workers)

    # Models: identical initialisation on every rank (DDP would broadcast rank 0's anyway), then
    # a per-rank seed for dropout.
    torch.manual_seed(cfg.seed)
    G, D = build_models(cfg.model)
    n_params = (count_parameters(G), count_parameters(D))
    ema = GeneratorEMA(G, cfg.ema.decay, cfg.ema.rampup) if cfg.ema.enabled else None
    if ema is not None:
        ema.shadow.to(device)
    fused, betas = compat.fused_adam(device.type), (cfg.optim.beta1, cfg.optim.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=cfg.optim.lr_g, betas=betas, fused=fused)
    opt_d = torch.optim.Adam(D.parameters(), lr=cfg.optim.lr_d, betas=betas, fused=fused)
    if cfg.train.compile:
        G, D = compile_models(G, D, cfg.train.compile_mode, device.type)
    G, D, opt_g, opt_d, loader = acc.prepare(G, D, opt_g, opt_d, loader)
    torch.manual_seed(cfg.seed * 7919 + 1 + rank)

    evaluator = real_stats = None
    if cfg.eval.every:  # all ranks: the main process trains/caches the evaluator first, the others wait
        from gan_ddp.evaluation.evaluate import prepare_evaluation
        from gan_ddp.evaluation.evaluator import RealData

        real = RealData(cfg.data.dataset, cfg.data.root, cfg.data.split, images, labels, data_info.sha256)
        evaluator, real_stats = prepare_evaluation(acc, real, cfg.eval.cache_dir, kind=cfg.eval.evaluator)

    steps_per_epoch = len(loader)
    by_epochs = cfg.train.epochs * steps_per_epoch
    fixed_labels = None
    if cfg.model.conditional:  # grids: one row per class, the same noise down each column
        z, y = class_grid_inputs(max(1, round(cfg.log.n_samples / N_CLASSES)), cfg.model.z_dim, cfg.seed + 2**20)
        fixed_noise, fixed_labels = z.to(device), y.to(device)
    else:
        grid_gen = torch.Generator().manual_seed(cfg.seed + 2**20)
        fixed_noise = torch.randn(cfg.log.n_samples, cfg.model.z_dim, generator=grid_gen).to(device)
    return Parts(
        cfg=cfg,
        created=created,
        precision=precision,
        precision_reason=reason,
        accelerator=acc,
        world=world,
        rank=rank,
        device=device,
        is_main=acc.is_main_process,
        console=console,
        run_dir=run_dir,
        run_lock=lock,
        threads=threads,
        local_batch=local_batch,
        data_info=data_info,
        images=images,
        labels=labels,
        loader=loader,
        steps_per_epoch=steps_per_epoch,
        total_steps=min(cfg.train.steps, by_epochs) if cfg.train.steps else by_epochs,
        G=G,
        D=D,
        G_raw=acc.unwrap_model(G),
        D_raw=acc.unwrap_model(D),
        opt_g=opt_g,
        opt_d=opt_d,
        ema=ema,
        n_params=n_params,
        cuda_graphs=cfg.train.compile and cfg.train.compile_mode == "reduce-overhead",
        evaluator=evaluator,
        real_stats=real_stats,
        fixed_noise=fixed_noise,
        fixed_labels=fixed_labels,
        augment=DiffAugment(cfg.augment, cfg.seed, B, rank, local_batch),
        clusterer=Clusterer(images.unsqueeze(1), cfg.model.clusters, plan.images, plan.iters, cfg.seed)
        if (plan := cfg.selfcond) and cfg.model.clusters
        else None,
    )


def lock_run_dir(run_dir: Path, is_main: bool, world: int, console: TrainingConsole) -> runlock.RunLock | None:
    """The main process takes the run directory's lock; the other processes learn the outcome, so that
    all of them stop at once when another training holds it."""
    failure: Exception | None = None
    lock = None
    if is_main:
        try:
            lock = runlock.acquire(run_dir, warn=console.print)
        except (runlock.RunLockError, OSError) as exc:
            failure = exc
    if world > 1:
        from accelerate.utils import broadcast_object_list

        if broadcast_object_list([str(failure) if failure else ""])[0] and failure is None:
            raise runlock.RunLockError("the main process could not lock run.dir (see its error line)")
    if failure is not None:
        raise failure
    return lock


def check_same_data(accelerator: Any, data_info: DataInfo, rank: int) -> None:
    """Collective: every rank read the same bytes (a download or fallback may go differently per node)."""
    if accelerator.num_processes == 1:
        return
    # 52 bits of the checksum: exact in a float64, and collectives of float64 work on every backend.
    digest = torch.tensor([float(int(data_info.sha256[:13], 16))], dtype=torch.float64, device=accelerator.device)
    if len(set(accelerator.gather(digest).tolist())) > 1:  # every rank sees every digest
        raise DataError(
            f"processes read different data ({data_info.describe()} on rank {rank}); "
            "give every node the same data.root contents"
        )
