"""Differences between the torch versions gan-ddp supports, in one place.

Two stacks are installed and tested (`launch/stacks/*.txt`): current torch, and torch 2.0.1 (`STACK=k80`),
the newest PyPI build that still carries sm_37 kernels for the K80. Code elsewhere asks this module what
the running torch can do instead of comparing versions itself; each guard says which version added what.

Importing this module installs the shims old torch needs (`install_shims`, once per process; idempotent):
every module that builds an Accelerator, a process group or a loader Accelerate prepares imports it.
"""

from __future__ import annotations

import functools
import sys
import time

import torch
from torch.torch_version import TorchVersion

from gan_ddp.errors import one_line

TORCH = TorchVersion(torch.__version__)  # compares with strings: TORCH >= "2.4"; local tags (+cu117) ignored
MIN_TORCH = "2.0"  # what pyproject.toml allows: torch 2.0 is the oldest release any stack uses


def _version(version: str | None) -> TorchVersion:
    return TORCH if version is None else TorchVersion(version)


def fused_adam(device_type: str, version: str | None = None) -> bool:
    """Whether `torch.optim.Adam(fused=True)` runs on this device type: CUDA since torch 2.0, CPU since 2.4
    (2.0 raises "`fused=True` requires all the params to be floating point Tensors of supported devices")."""
    if device_type == "cuda":
        return True
    return device_type == "cpu" and _version(version) >= "2.4"


def compile_unsupported(version: str | None = None, python: tuple[int, int] | None = None) -> str | None:
    """Why `torch.compile` cannot run here, or None when it can. TorchDynamo follows CPython's frame
    evaluation API, so each torch release supports a range of Pythons: 2.0 stops at 3.10 (3.11 came in 2.1)."""
    py = python or sys.version_info[:2]
    if _version(version) < "2.1" and py >= (3, 11):
        return f"torch {_version(version)} supports torch.compile only up to Python 3.10 (this is {py[0]}.{py[1]})"
    if version is None and python is None:  # the running interpreter: ask Dynamo itself where it can tell
        try:
            from torch._dynamo.eval_frame import check_if_dynamo_supported

            check_if_dynamo_supported()
        except ImportError:
            pass
        except RuntimeError as exc:
            return one_line(exc, first_line=True)
    return None


def weights_only_is_safe(version: str | None = None) -> bool:
    """Whether `torch.load(weights_only=True)` (torch's restricted unpickler) can be trusted with a file
    from a stranger: from torch 2.6, which fixed CVE-2025-32434 (code execution through weights_only=True
    in torch <= 2.5.1). Only checkpoints of earlier gan-ddp versions need it; current ones hold no pickles."""
    return _version(version) >= "2.6"


def restricted_torch_load(path: object) -> object:
    """torch.load with torch's restricted unpickler, allowing only the NumPy types Accelerate's RNG files
    hold (as Accelerate itself does); torch's warnings are silenced so that our one error line stands alone.
    Callers check `weights_only_is_safe()` first."""
    import warnings

    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with warnings.catch_warnings(), torch.serialization.safe_globals(allowed):
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def cudagraph_mark_step_begin() -> None:
    """Tell torch.compile's CUDA-graph trees that a new training step starts, so outputs of the previous
    step's graphs may be overwritten (torch >= 2.1; 2.0's reduce-overhead mode has no such marker)."""
    mark = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    if mark is not None:
        mark()


def cuda_arch_flags() -> list[str]:
    """The GPU architectures this torch build has kernels for (`sm_XY`, plus `compute_XY` PTX), read from
    the build without touching a GPU. Empty for CPU-only builds."""
    if not torch.backends.cuda.is_built():
        return []
    getter = getattr(torch._C, "_cuda_getArchFlags", None)
    flags = getter() if getter is not None else ""
    return flags.split() if flags else list(torch.cuda.get_arch_list())


def _cpu_set_device(device: object) -> None:
    """torch >= 2.1's `torch.cpu.set_device`: a CPU has one device, nothing to select."""


# torch.cpu's device-module functions as torch 2.1 defines them (trivial: a CPU is one device).
CPU_DEVICE_MODULE = {
    "device_count": lambda: 1,
    "set_device": _cpu_set_device,
    "current_device": lambda: "cpu",
    "is_available": lambda: True,
    "synchronize": lambda device=None: None,
}


def install_shims() -> None:
    """Fill the gaps of old torch that libraries we use step into. Idempotent; never replaces a real one.

    Accelerate (checked 0.34 to 1.15) treats `torch.cpu` as a device module when it sets up a
    multi-process CPU run (`PartialState.set_device` calls `device_count()` and `set_device()`); torch
    added those functions in 2.1. Without them `torchrun --nproc_per_node N` fails on torch 2.0 (the K80
    stack) before training starts. A shim is smaller and safer than pinning an Accelerate old enough not
    to call them (those predate `use_seedable_sampler` and the loader's `set_epoch`, which we rely on)."""
    for name, function in CPU_DEVICE_MODULE.items():
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, function)

    if TORCH < "2.1":
        _settle_gloo_before_teardown()


# How long the main thread lets gloo's worker threads finish before it destroys a process group.
GLOO_SETTLE_S = 0.2


def _settle_gloo_before_teardown() -> None:
    """torch 2.0 can deadlock when a gloo process group is destroyed (seen here on the K80 stack: ranks hung
    for good at the end of training, in three of the suite's multi-process tests in one run). The group's
    destructor joins its worker thread while holding the GIL, and that thread may still be freeing the
    tensors of the last collective, which needs the GIL (it drops their Python objects). Waiting a moment,
    with the GIL released, before the group is destroyed lets the worker finish first. Accelerate calls
    `torch.distributed.destroy_process_group` through the module, so wrapping it there covers
    `end_training` and our own teardown alike."""
    import torch.distributed as dist

    destroy = dist.destroy_process_group
    if getattr(destroy, "_gan_ddp_settles", False):
        return

    @functools.wraps(destroy)
    def destroy_process_group(*args: object, **kwargs: object) -> None:
        time.sleep(GLOO_SETTLE_S)
        destroy(*args, **kwargs)

    destroy_process_group._gan_ddp_settles = True  # type: ignore[attr-defined]
    dist.destroy_process_group = destroy_process_group


install_shims()  # on import: whoever imports compat (distributed, data, ...) runs on a shimmed torch
