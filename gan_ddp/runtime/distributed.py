"""Everything about processes and devices: building the Accelerator, choosing precision by hardware,
refusing silently non-distributed launches, checking that ranks hold identical weights."""

from __future__ import annotations

import atexit
import contextlib
import inspect
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
from torch import nn

from gan_ddp.config import ConfigError
from gan_ddp.errors import GanDdpError

# Every Accelerator and process group of gan-ddp is made through this module: importing compat filled old
# torch's gaps first (compat.install_shims).
from gan_ddp.runtime import compat  # noqa: F401


class DistributedSetupError(GanDdpError, RuntimeError):
    """The launch does not match what the processes see; the message says how to launch correctly."""


def choose_precision(
    requested: str,
    device_type: str,
    capability: tuple[int, int] | None = None,
    cpu_has_bf16: bool = False,
) -> tuple[str, str]:
    """Return (precision, reason). Pure, so the GPU branches are testable on a CPU box.

    CUDA: bf16 from compute capability 8.0 (A100, H100, A10G; same exponent range as fp32, no scaler);
    fp16 with a gradient scaler where fp16 arithmetic is fast: tensor cores from 7.0 (V100, T4) and the
    P100's double-rate fp16 (6.0); fp32 everywhere else (K80 3.7, Maxwell 5.x, consumer Pascal 6.1/6.2,
    where fp16 runs at a fraction of fp32's rate or is emulated). CPU: bf16 autocast when the CPU has
    native bf16 dot products (AVX512-BF16/AMX): in same-period A/B runs on this project's CPU machines it
    was 1.37-1.51x faster per step than fp32 (docs/speed.md); plain fp32 otherwise, because emulated
    bf16 is slower than fp32.
    """
    if requested != "auto":
        if requested == "fp16" and device_type == "cpu":
            # Accelerate applies neither fp16 autocast nor a gradient scaler on CPU: it would silently be fp32.
            raise ConfigError("train.precision: fp16 needs a GPU; on CPU use bf16 or no (or auto)")
        if requested == "bf16" and device_type == "cuda" and capability and capability < (8, 0):
            return "bf16", f"requested (compute capability {capability[0]}.{capability[1]} has no native bf16)"
        return requested, "requested"
    if device_type == "cuda":
        assert capability is not None
        cc = f"{capability[0]}.{capability[1]}"
        if capability >= (8, 0):
            return "bf16", f"auto: CUDA compute capability {cc} >= 8.0 has native bf16"
        if capability >= (7, 0):
            return "fp16", f"auto: CUDA compute capability {cc} has fp16 tensor cores: fp16 with a gradient scaler"
        if capability == (6, 0):
            return "fp16", "auto: CUDA compute capability 6.0 (P100) has double-rate fp16: fp16 with a gradient scaler"
        return "no", f"auto: CUDA compute capability {cc} has neither bf16 nor fast fp16: fp32"
    if cpu_has_bf16:
        return "bf16", "auto: CPU with native bf16 (AVX512-BF16/AMX), measured faster than fp32"
    return "no", "auto: CPU without native bf16: fp32"


def cpu_has_native_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


def want_cpu() -> bool:
    """Build the Accelerator with cpu=True when no GPU is visible: otherwise `torchrun` or
    `accelerate launch --multi_gpu` on a GPU-less box start N processes that each train alone."""
    return not torch.cuda.is_available()


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)


def launched_world_size(environ: dict[str, str] | None = None) -> int:
    """How many processes the launcher started (torchrun, accelerate launch, our SLURM script set WORLD_SIZE); 1
    without a launcher."""
    env = os.environ if environ is None else environ
    return int(env.get("WORLD_SIZE", "1") or 1)


def check_distributed(num_processes: int, environ: dict[str, str] | None = None) -> None:
    """Refuse to run N independent trainings that each believe they are alone."""
    launched = launched_world_size(environ)
    if launched > 1 and num_processes != launched:
        raise DistributedSetupError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but Accelerate set up "
            f"{num_processes}: each would train alone. Without GPUs launch with "
            "`ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N` or "
            "`torchrun --nproc_per_node N` (see launch/cpu_multiproc.sh); on a GPU box check `nvidia-smi`"
        )


def main_process_warnings_only(environ: dict[str, str] | None = None) -> None:
    """Silence Python warnings on every rank but global rank 0: all ranks run the same code, so rank 0
    already prints each library warning (once per place, Python's default); N copies only bury the log."""
    env = os.environ if environ is None else environ
    if int(env.get("RANK", "0") or 0) > 0:
        warnings.simplefilter("ignore")


def ddp_kwargs(ddp_class: type | None = None):
    """DDP options of both models, as Accelerate's kwargs handler.

    No buffer sync in forward: with BatchNorm in D, the D step runs D(real) and D(fake) before one
    backward; DDP's default re-broadcast of buffers before the second forward modifies tensors the first
    forward saved (pytorch #22095). Ranks keep their own BN statistics instead, which are averaged before
    anything reads them (grids, checkpoints: `average_buffers`), as StyleGAN2-ADA does.
    At wrap time: torch >= 2.13 says this with `forward_sync_buffers=False` (`broadcast_buffers` is
    deprecated there, with a FutureWarning per rank) and still broadcasts rank 0's buffers once; older torch
    (2.0 on K80s) only has `broadcast_buffers=False`, which skips that broadcast too. Either is right here:
    every rank builds the models from the same seed, so the buffers start equal.
    gradient_as_bucket_view: gradients live in DDP's all-reduce buckets, saving a copy per step (measured
    +5% images/s with 2 gloo processes on CPU).
    """
    from accelerate.utils import DistributedDataParallelKwargs

    if ddp_class is None:
        from torch.nn.parallel import DistributedDataParallel as ddp_class
    if "forward_sync_buffers" not in inspect.signature(ddp_class.__init__).parameters:
        return DistributedDataParallelKwargs(broadcast_buffers=False, gradient_as_bucket_view=True)

    # Accelerate's handler (1.16) does not know the new flag; it passes every field that differs from the
    # default on to DDP, so one more field is all it takes.
    @dataclass
    class DDPKwargs(DistributedDataParallelKwargs):
        forward_sync_buffers: bool | None = None

    return DDPKwargs(forward_sync_buffers=False, gradient_as_bucket_view=True)


def make_accelerator(
    precision: str, log_with: str | None = None, project_dir: str | None = None, timeout_s: float | None = None
):
    """The one Accelerator of a run. Imported lazily so the leaf modules test without Accelerate.

    `timeout_s` bounds every collective: a process whose peer stalls (SIGSTOP, swap, hung filesystem)
    fails after that long instead of waiting torch's default 30 minutes. gloo raises a RuntimeError
    ("Timed out waiting ...") in the waiting process; NCCL's watchdog aborts the process."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = [] if timeout_s is None else [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))]
    accelerator = Accelerator(
        cpu=want_cpu(),
        mixed_precision=precision,
        kwargs_handlers=handlers,
        # Our sampler derives each epoch's order from (seed, epoch) on every rank: nothing to broadcast.
        rng_types=[],
        log_with=log_with,
        project_dir=project_dir,
    )
    # Set here rather than through kwargs_handlers=, which accepts only Accelerate's own class;
    # prepare() reads it when it wraps each model in DDP.
    accelerator.ddp_handler = ddp_kwargs()
    return accelerator


def unwrap(accelerator: Any, model: nn.Module) -> nn.Module:
    """`accelerator.unwrap_model(model)`, without its cost where it has nothing to do.

    Accelerate's unwrap first asks whether the model is compiled, through `torch._dynamo`, and on torch >= 2.1
    touching that attribute imports TorchDynamo: ~1.3 CPU-s in a process that never needed it (`gan-ddp eval`
    scoring a plain generator). A compiled module implies TorchDynamo is loaded, and the parallel wrappers
    (DDP, DataParallel, FSDP, DeepSpeed) hold the model in `.module`: a model with neither is its own unwrapped
    self."""
    if "torch._dynamo" not in sys.modules and not hasattr(model, "module"):
        return model
    return accelerator.unwrap_model(model)


def average_buffers(accelerator, modules: Iterable[nn.Module]) -> None:
    """Average floating-point buffers (BatchNorm running stats) over processes; all ranks must call."""
    if accelerator.num_processes == 1:
        return
    for module in modules:
        for buf in module.buffers():
            if buf.is_floating_point():
                buf.copy_(accelerator.reduce(buf.detach().clone(), reduction="mean"))


def broadcast_from_main(accelerator, tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor, in place, with the main process's; all ranks must call."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import broadcast

    for t in tensors:
        t.copy_(broadcast(t.detach().clone(), from_process=0))


def weights_digest(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor]:
    """Per-tensor float64 checksums (sum and a position-weighted sum, so permutations are caught)."""
    names, sums = [], []
    for name, t in named:
        flat = t.detach().reshape(-1).double()
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
        names.append(name)
        sums.append(torch.stack([flat.sum(), (flat * weights).sum() / flat.numel()]))
    return names, torch.stack(sums)


class ConsistencyError(GanDdpError, RuntimeError):
    """Ranks hold different weights; the message names the first differing tensor."""


def check_consistency(
    accelerator, models: dict[str, nn.Module], step: int | None, buffers: bool = True, hint: str = ""
) -> int:
    """All ranks: gather weight checksums and fail, naming the first tensor that differs from rank 0.
    Buffers (BatchNorm statistics) are compared only when asked: ranks keep their own between the
    points where `average_buffers` syncs them; `step` None leaves the step out of the message and `hint` ends it.
    Returns the number of tensors compared (0 with one process)."""
    if accelerator.num_processes == 1:
        return 0
    named = [
        (f"{prefix}.{name}", t)
        for prefix, model in models.items()
        for name, t in list(model.named_parameters()) + (list(model.named_buffers()) if buffers else [])
    ]
    names, digest = weights_digest(named)
    everyone = accelerator.gather(digest.unsqueeze(0).to(accelerator.device))  # (world, n_tensors, 2)
    # NaN != NaN: a tensor that is NaN on every rank is not a difference between ranks (the divergence
    # guard reports it), a NaN on some ranks only is.
    both_nan = everyone.isnan() & everyone[0:1].isnan()
    differs = ((everyone != everyone[0:1]) & ~both_nan).any(dim=2)  # (world, n_tensors)
    if bool(differs.any()):
        rank, index = (int(i) for i in differs.nonzero()[0])
        at = "" if step is None else f" at step {step}"
        raise ConsistencyError(
            f"DDP consistency check failed{at}: {names[index]} differs between rank 0 and rank {rank}{hint}"
        )
    return len(names)


# -- naming a lost process ----------------------------------------------------------------------------------
# A failed collective says little about whom it waited for (gloo: "Timed out waiting 600000ms for recv").
# The rendezvous store (torchrun's or Accelerate's TCP store, on the first node) outlives the collective: every
# process writes its host name there at start; after a failure each one that is still able to checks in and
# waits briefly for the others, and those that never check in are the lost ones.


def _store_key(kind: str, rank: int) -> str:
    # an elastic restart is a new round: keys of a failure before it must not count
    return f"gan_ddp/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{kind}/{rank}"


def _default_store():
    try:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store() if dist.is_available() and dist.is_initialized() else None
    except Exception:  # a torch without the private helper: no names, the plain line stays
        return None


def announce_host(rank: int) -> None:
    """Write this process's host name to the rendezvous store (all ranks, once, at start)."""
    import socket

    store = _default_store()
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(_store_key("host", rank), socket.gethostname())


def lost_peers(rank: int, world: int, wait_s: float = 10.0) -> str | None:
    """After a failed collective: which processes did not check in within `wait_s`, with their hosts
    (e.g. "rank 1 on gdtest-n2 did not answer"), or that this process lost the store itself (its host
    is the one cut off). None when there is nothing to say (no store, every process answered).

    The store's client blocks without a timeout in some calls (`check` waits in a plain recv): the talk with
    the store runs in a daemon thread, given `wait_s` plus 5 s."""
    import socket
    import threading
    from datetime import timedelta

    store = _default_store()
    if store is None or world < 2:
        return None
    me = socket.gethostname()
    found: dict[str, Any] = {}

    def ask() -> None:
        store.set_timeout(timedelta(seconds=max(1.0, wait_s)))
        store.set(_store_key("failed", rank), me)
        missing = [r for r in range(world) if r != rank]
        deadline = time.monotonic() + wait_s
        while missing and time.monotonic() < deadline:
            time.sleep(0.2)
            missing = [r for r in missing if not store.check([_store_key("failed", r)])]
        hosts = {}
        for r in missing:
            key = _store_key("host", r)
            hosts[r] = store.get(key).decode() if store.check([key]) else "?"
        found["hosts"] = hosts

    thread = threading.Thread(target=_run, args=(ask, found), daemon=True)
    thread.start()
    thread.join(wait_s + 5)
    if "hosts" not in found:
        where = os.environ.get("MASTER_ADDR", "the first node")
        return (
            f"this process (rank {rank} on {me}) cannot reach the rendezvous store at {where} either: "
            "this host lost the network, or the first node is gone"
        )
    if not found["hosts"]:
        return None
    by_host: dict[str, list[int]] = {}
    for r, host in found["hosts"].items():
        by_host.setdefault(host, []).append(r)
    parts = [f"rank{'s' if len(rs) > 1 else ''} {', '.join(map(str, rs))} on {host}" for host, rs in by_host.items()]
    return f"{'; '.join(parts)} did not answer within {wait_s:g} s (lost host, network or process)"


def _run(fn: Callable[[], None], found: dict[str, Any]) -> None:
    try:
        fn()
    except Exception as exc:  # the store is unreachable too: the caller says so
        found["error"] = exc


# -- leaving a process that was one of many ------------------------------------------------------------------
# A crash torch leaves to the caller (seen here: 1 run in 80 of a 4-process CPU training, and in CI): DDP keeps
# its gloo process group, and with it gloo's worker threads, alive after `destroy_process_group` (pytorch#107298).
# A worker that has just finished a collective frees its tensors a moment after the caller's wait returned; when
# one of them still owns its Python object, freeing it needs the GIL. If that moment falls inside the
# interpreter's shutdown, CPython ends the thread where it stands, the unwind meets a C++ destructor and the
# process aborts (SIGABRT, "terminate called without an active exception") after a run that finished well.
# Nothing the caller can join or wait on exists for those threads, so such a process does the interpreter's
# shutdown work that matters itself (other threads joined, atexit handlers run, output flushed), with the
# interpreter still whole, and then leaves without the teardown: there is nothing left in it a worker could
# trip over.


def leave_process(code: int) -> NoReturn:
    """End this process with `code` the way `sys.exit` would, minus the interpreter's own teardown.

    For processes of a multi-process launch (after training; the process group is already destroyed) and runs
    stopped by a signal: the interpreter's own first steps of an exit, in its order, while it still works: the
    threading module's shutdown (its exit hooks, which tell idle `concurrent.futures` pool threads to end, then the
    join of every non-daemon thread; joining them without the hooks waited forever on an idle pool thread), the
    atexit handlers (trackers, multiprocessing children, logging), stdout/stderr flushed; then the process exits
    at once. Both private calls are what the interpreter itself calls at exit; the public API has no "run now"."""
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe must not change the exit code
            stream.flush()
    os._exit(code)
