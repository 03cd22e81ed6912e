"""`gan-ddp doctor`: what this machine and this torch build can do, on one screen; and the check that
`gan-ddp train` runs at start-up so a GPU without kernels in the build stops the run with one line
instead of failing mid-run with "no kernel image is available for execution on the device".

Facts are gathered once (`gather`) into a plain `Machine`; everything else is a pure function of it,
so every branch is tested with made-up machines (a K80 with the default stack, eight H100s, no GPU).
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gan_ddp.errors import GanDdpError
from gan_ddp.runtime import compat
from gan_ddp.runtime.distributed import choose_precision, cpu_has_native_bf16

EXIT_OK = 0
EXIT_UNUSABLE = 2  # a visible GPU this build cannot run (or a driver torch cannot use)

# Architectures of PyPI's torch 2.0.1 (cu117) wheel, the K80 stack (launch/stacks/k80.txt), read from
# `torch._C._cuda_getArchFlags()` on 2026-11-24: it is what `make install STACK=k80` gives.
K80_STACK_ARCHS = ("sm_37", "sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86")
K80_STACK_INSTALL = "make install STACK=k80"
CONFIG = "configs/mnist_mlp.yaml"


class GPUSupportError(GanDdpError, RuntimeError):
    """A visible GPU has no kernels in this torch build; the message says what to install."""


@dataclass
class GPU:
    index: int
    name: str
    capability: tuple[int, int]
    memory_gib: float


@dataclass
class Machine:
    torch: str
    cuda: str | None  # CUDA version torch was built with (None: CPU-only build)
    cudnn: int | str | None  # version number, or why it cannot be used
    archs: list[str]  # sm_XY / compute_XY this build carries kernels (or PTX) for
    gpus: list[GPU] = field(default_factory=list)
    cuda_available: bool = False
    driver: str | None = None  # NVIDIA kernel driver version, when one is loaded
    nccl: str | None = None  # NCCL version, None when this build has no NCCL
    gloo: bool = True
    cpu_bf16: bool = False
    cpus: int = 1
    python: str = ""
    accelerate: str | None = None


def _arch_number(arch: str) -> int | None:
    match = re.fullmatch(r"(?:sm|compute)_(\d+)[a-z]?", arch)
    return int(match.group(1)) if match else None


def has_kernels(capability: tuple[int, int], archs: list[str]) -> bool:
    """Whether code built for `archs` runs on a GPU of `capability`. A cubin for sm_XY runs on X.Z for
    Z >= Y (same major only); PTX (compute_XY) is compiled by the driver for any capability >= X.Y."""
    major, minor = capability
    cc = major * 10 + minor
    for arch in archs:
        number = _arch_number(arch)
        if number is None:
            continue
        if arch.startswith("sm_") and number // 10 == major and number % 10 <= minor:
            return True
        if arch.startswith("compute_") and number <= cc and not arch[-1].isalpha():
            return True
    return False


def install_advice(capability: tuple[int, int]) -> str:
    """What to install for a GPU the current build has no kernels for."""
    cc = f"{capability[0]}.{capability[1]}"
    if has_kernels(capability, list(K80_STACK_ARCHS)):
        return (
            f"install the K80 stack, torch 2.0.1 with kernels for sm_37 to sm_86: `{K80_STACK_INSTALL}` "
            "(docs/gpus.md; on EC2 p2 see launch/ec2.md)"
        )
    return (
        f"install a torch build whose architecture list includes sm_{capability[0]}{capability[1]} "
        f"(compute capability {cc}); see docs/gpus.md"
    )


def kernel_problems(machine: Machine) -> list[str]:
    """One line per visible GPU this torch build cannot run."""
    problems = []
    for gpu in machine.gpus:
        if not has_kernels(gpu.capability, machine.archs):
            cc = f"{gpu.capability[0]}.{gpu.capability[1]}"
            problems.append(
                f"GPU {gpu.index} ({gpu.name}, compute capability {cc}) has no kernels in this torch "
                f"{machine.torch} build (it has {' '.join(machine.archs) or 'none'}): {install_advice(gpu.capability)}"
            )
    return problems


def driver_problem(machine: Machine) -> str | None:
    """An NVIDIA driver is loaded but torch sees no GPU (typically a driver older than the build's CUDA
    needs, such as driver 470 of a K80 box under a CUDA 12/13 build). Not reported when GPUs are hidden
    on purpose (CUDA_VISIBLE_DEVICES set, as launch/cpu_multiproc.sh does)."""
    if machine.driver is None or machine.cuda_available or machine.cuda is None:
        return None
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return None
    return (
        f"NVIDIA driver {machine.driver} is loaded but this torch {machine.torch} build (CUDA {machine.cuda}) "
        "sees no GPU: training would run on the CPU. The driver is probably older than the build needs; "
        f"driver 470 (the last with K80 support) takes the K80 stack: `{K80_STACK_INSTALL}`. "
        "To use the CPU on purpose, set CUDA_VISIBLE_DEVICES="
    )


def auto_precision(machine: Machine) -> tuple[str, str]:
    if machine.gpus:
        return choose_precision("auto", "cuda", capability=machine.gpus[0].capability)
    return choose_precision("auto", "cpu", cpu_has_bf16=machine.cpu_bf16)


def launch_command(machine: Machine) -> str:
    n = len(machine.gpus)
    if n == 0:
        return (
            f"gan-ddp train --config {CONFIG}   (one process, all cores; several: "
            f"NPROC=2 bash launch/cpu_multiproc.sh --config {CONFIG})"
        )
    if n == 1:
        return f"bash launch/gpu_local.sh --config {CONFIG}   (one GPU, one process)"
    return (
        f"bash launch/gpu_local.sh --config {CONFIG}   ({n} GPUs, one process each; "
        f"or torchrun --nproc_per_node {n} -m gan_ddp train --config {CONFIG})"
    )


def loaded_driver() -> str | None:
    """Version of the loaded NVIDIA kernel module (/proc/driver/nvidia/version), None when none is loaded."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text)
    return match.group(1) if match else "unknown version"


def _driver_version() -> str | None:
    return loaded_driver() or ("unknown version" if shutil.which("nvidia-smi") else None)


def visible_gpus() -> list[GPU]:
    """Every GPU torch can see (reading properties needs no kernel, so it works without kernels too)."""
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(GPU(i, props.name, (props.major, props.minor), props.total_memory / 2**30))
    return gpus


def gather() -> Machine:
    """The facts of this machine and this torch build (initialises CUDA when a GPU is visible)."""
    import torch.distributed as dist

    cuda_available = torch.cuda.is_available()
    gpus = visible_gpus() if cuda_available else []
    nccl = None
    if dist.is_available() and dist.is_nccl_available():
        try:
            version = torch.cuda.nccl.version()
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception:  # built with NCCL but the library cannot be loaded here
            nccl = "built in, version unknown"
    try:
        import accelerate

        accelerate_version = accelerate.__version__
    except ImportError:
        accelerate_version = None
    try:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except RuntimeError as exc:  # current torch refuses to even load its cuDNN 9.11+ beside a GPU below 7.5
        cudnn = f"unusable here ({str(exc).split('. ')[0]})"
    return Machine(
        torch=str(torch.__version__),
        cuda=torch.version.cuda,
        cudnn=cudnn,
        archs=compat.cuda_arch_flags(),
        gpus=gpus,
        cuda_available=cuda_available,
        driver=_driver_version(),
        nccl=nccl,
        gloo=dist.is_available() and dist.is_gloo_available(),
        cpu_bf16=cpu_has_native_bf16(),
        cpus=os.cpu_count() or 1,
        python=platform.python_version(),
        accelerate=accelerate_version,
    )


def render(machine: Machine) -> list[str]:
    """The doctor's screen, line by line."""
    yes_no = {True: "yes", False: "no"}
    lines = [
        f"python       {machine.python}   torch {machine.torch}   accelerate {machine.accelerate or 'not installed'}",
        f"CUDA build   {machine.cuda or 'none (CPU-only build)'}   cuDNN {machine.cudnn or 'none'}   "
        f"driver {machine.driver or 'none loaded'}",
        f"kernels for  {' '.join(machine.archs) or 'no GPU architecture'}",
        f"CPU          {machine.cpus} cores, native bf16 {yes_no[machine.cpu_bf16]}",
        f"collectives  NCCL {machine.nccl or 'not available'}   gloo {yes_no[machine.gloo]}",
    ]
    if not machine.gpus:
        lines.append("GPUs         none visible")
    for gpu in machine.gpus:
        ok = has_kernels(gpu.capability, machine.archs)
        lines.append(
            f"GPU {gpu.index}        {gpu.name}, compute capability {gpu.capability[0]}.{gpu.capability[1]}, "
            f"{gpu.memory_gib:.1f} GiB, kernels in this build: {yes_no[ok]}"
        )
    precision, reason = auto_precision(machine)
    lines.append(f"precision    train.precision=auto -> {precision} ({reason})")
    lines.append(f"launch       {launch_command(machine)}")
    return lines


def check_gpu_kernels(machine: Machine | None = None) -> None:
    """Train's start-up check: raise GPUSupportError (one line) if a visible GPU has no kernels here."""
    if machine is None:
        if not torch.cuda.is_available():
            # A loaded driver that this build cannot use (driver 470 under CUDA 13) would train on the CPU
            # without a word; only the kernel module counts here, not an nvidia-smi left on the PATH.
            driver = loaded_driver()
            problem = driver_problem(
                Machine(torch=str(torch.__version__), cuda=torch.version.cuda, cudnn=None, archs=[], driver=driver)
            )
            if problem:
                raise GPUSupportError(problem)
            return
        # only what the check needs: every rank runs it before training, so no cuDNN or NCCL probing
        machine = Machine(
            torch=str(torch.__version__),
            cuda=torch.version.cuda,
            cudnn=None,
            archs=compat.cuda_arch_flags(),
            gpus=visible_gpus(),
            cuda_available=True,
        )
    problems = kernel_problems(machine)
    if problems:
        more = f" (and {len(problems) - 1} more GPU(s) alike)" if len(problems) > 1 else ""
        raise GPUSupportError(problems[0] + more)


def run_doctor(machine: Machine | None = None, out=None) -> int:
    """Print the report; exit 0 when this machine can train as set up, 2 (with `error:` lines) when not."""
    out = out or sys.stdout
    machine = machine or gather()
    for line in render(machine):
        print(line, file=out)
    problems = kernel_problems(machine)
    driver = driver_problem(machine)
    if driver:
        problems.append(driver)
    for problem in problems:
        print(f"error: {problem}", file=out)
    return EXIT_UNUSABLE if problems else EXIT_OK
