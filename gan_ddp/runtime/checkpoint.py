"""Atomic, complete, verifiable checkpoints.

Layout: `<run>/checkpoints/step_XXXXXXXX/` holds what `accelerator.save_state` writes (G and D in
safetensors, both optimizers, the gradient scaler, one RNG file per process), `ema.safetensors` when the
generator EMA is on, `trainer_state.json` (step, data position, model signature, tracker id), and last
`manifest.json` (size and sha256 of every file). Everything is written into a `.tmp-*` sibling first and
renamed only when every process is done and the manifest is on disk, so a directory named `step_*` with a
manifest that matches its files is complete. Loading never unpickles code: safetensors for weights and
`torch.load(weights_only=True)` (inside Accelerate) for optimizer and RNG state.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from gan_ddp.errors import GanDdpError
from gan_ddp.runtime import compat
from gan_ddp.runtime.fsutil import atomic_write

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
PREFIX = "step_"
# Fault injection for tests: die (as `kill -9` would) after the first files of a checkpoint are written.
CRASH_ENV = "GAN_DDP_TEST_CRASH_IN_SAVE"


class CheckpointError(GanDdpError, RuntimeError):
    """A checkpoint that is incomplete, corrupt or from another model; one line naming it."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, sort_keys=True)))


def write_manifest(directory: Path) -> None:
    """Hash every file (fsyncing it) and write the manifest last."""
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[str(p.relative_to(directory))] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    write_json_atomic(directory / MANIFEST, {"files": files})


def verify(directory: Path) -> None:
    """Raise CheckpointError unless every file listed in the manifest is present and intact."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(f"{directory}: incomplete checkpoint (no {MANIFEST})")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{manifest}: unreadable manifest ({exc})") from None
    for name, meta in files.items():
        p = directory / name
        if not p.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if p.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{p}: {p.stat().st_size} bytes, manifest says {meta['bytes']}")
        if _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"{p}: checksum does not match the manifest (corrupt file)")
    if STATE not in files:
        raise CheckpointError(f"{directory}: {STATE} is missing from the manifest")


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories (complete or not) sorted by step, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def find_latest(root: Path, warn=print) -> Path | None:
    """Newest checkpoint that verifies; a corrupt newer one is reported and skipped."""
    for candidate in reversed(list_checkpoints(root)):
        try:
            verify(candidate)
            return candidate
        except CheckpointError as exc:
            warn(f"skipping checkpoint: {exc}")
    return None


def read_state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / STATE).read_text())


def rotate(root: Path, keep: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep`, and stale temporaries. Main process only."""
    complete = []
    for p in list_checkpoints(root):
        if (p / MANIFEST).is_file():
            complete.append(p)
    removed = complete[:-keep] if keep > 0 else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def clean_temporaries(root: Path) -> None:
    """Remove leftovers of saves that were killed; main process only, before training starts."""
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


def save(accelerator, root: Path, step: int, state: dict[str, Any], extra_tensors: dict[str, Any] | None) -> Path:
    """Collective: every process must call it. Returns the final directory.

    A failure while writing (disk full, read-only filesystem, permissions) removes the half-written
    `.tmp-*` directory and raises an OSError that names it and its errno, whatever the library that
    failed said; earlier checkpoints are untouched (rotation runs only after a complete save)."""
    from gan_ddp.runtime.faults import as_os_error

    tmp = root / f".tmp-{step_dir_name(step)}"
    try:
        return _save(accelerator, root, step, state, extra_tensors)
    except BaseException as exc:
        error = as_os_error(exc, tmp) if isinstance(exc, Exception) else None  # reads free space: before cleaning
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None or error is exc:
            raise
        raise error from exc


def _save(accelerator, root: Path, step: int, state: dict[str, Any], extra_tensors: dict[str, Any] | None) -> Path:
    from safetensors.torch import save_file

    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if os.environ.get(CRASH_ENV) == str(step):
        os._exit(137)  # the test's `kill -9` in the middle of a save, deterministic
    if accelerator.is_main_process:
        if extra_tensors:
            save_file({k: v.detach().contiguous().cpu() for k, v in extra_tensors.items()}, tmp / "ema.safetensors")
        write_json_atomic(tmp / STATE, state)
    accelerator.wait_for_everyone()  # every process's RNG file is on disk
    if accelerator.is_main_process:
        write_manifest(tmp)
        if final.exists():  # a complete checkpoint of this step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    accelerator.wait_for_everyone()
    return final


def load_ema(directory: Path) -> dict[str, Any] | None:
    from safetensors.torch import load_file

    path = directory / "ema.safetensors"
    return load_file(path) if path.is_file() else None


def check_loadable(directory: Path, world_size: int) -> None:
    """Raise CheckpointError naming the file unless every pickled state loads under torch's safe loader
    (`weights_only=True`, with the numpy types Accelerate allows) and each of the `world_size` processes
    finds its RNG file. Accelerate itself skips an unreadable RNG file with an info-level log: the run
    would resume, but no longer exactly. Every rank runs this on the same files and raises alike."""
    from accelerate.utils import load

    for path in sorted([*directory.glob("*.bin"), *directory.glob("*.pkl")]):
        try:
            if not compat.safe_load_allowlist():
                # Accelerate's `load` (and so `load_state`) falls back to a plain, code-running torch.load
                # below torch 2.4: read the pickle's imports ourselves before anything unpickles it.
                _check_pickle_globals(path)
            loaded = load(path, map_location="cpu")
        except Exception as exc:
            raise CheckpointError(
                f"{path}: fails safe loading (torch.load weights_only=True): {_reason(exc)}"
            ) from None
        if path.name.startswith("random_states_") and not (
            isinstance(loaded, dict) and {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(loaded)
        ):
            raise CheckpointError(f"{path}: not a random-state file (exact resume needs every process's RNG state)")
    for rank in range(world_size):
        if not (directory / f"random_states_{rank}.pkl").is_file():
            raise CheckpointError(f"{directory}: random_states_{rank}.pkl is missing (process {rank}'s RNG state)")


def _allowed_global(name: str) -> bool:
    """What torch.save and Accelerate's RNG files import: tensor and storage rebuilders, an ordered dict,
    numpy arrays (the numpy RNG state) and the codec pickle uses for bytes. Nothing that can run a command."""
    module, _, attr = name.rpartition(".")
    return (
        name in _SAFE_GLOBALS
        or (module == "torch" and attr.endswith("Storage"))
        or (module == "torch._utils" and attr.startswith("_rebuild_"))
        or (module in ("numpy.core.multiarray", "numpy._core.multiarray") and attr in ("_reconstruct", "scalar"))
    )


_SAFE_GLOBALS = {
    "collections.OrderedDict",
    "numpy.ndarray",
    "numpy.dtype",
    "_codecs.encode",
    "torch.Size",
    "torch.device",
    "torch.storage.UntypedStorage",
    "torch.storage._load_from_bytes",
}


def _check_pickle_globals(path: Path) -> None:
    """Raise ValueError("Trying to load unsupported GLOBAL m.n") for the first import outside `_allowed_global`
    in the pickle at `path` (or in each pickle of a torch.save zip). Reads opcodes only: nothing is executed."""
    import io
    import pickletools
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            payloads = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    else:
        payloads = [path.read_bytes()]
    for payload in payloads:
        strings: list[str] = []
        for op, arg, _ in pickletools.genops(io.BytesIO(payload)):
            if isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)  # STACK_GLOBAL takes module and name from the two strings pushed before it
            elif op.name in ("GLOBAL", "INST"):
                name = str(arg).replace(" ", ".")
            elif op.name == "STACK_GLOBAL":
                name = ".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>"
            else:
                continue
            if op.name in ("GLOBAL", "INST", "STACK_GLOBAL") and not _allowed_global(name):
                raise ValueError(f"Trying to load unsupported GLOBAL {name}")


def _reason(exc: Exception) -> str:
    """The informative line of torch's multi-paragraph weights_only error ("Trying to load unsupported
    GLOBAL posix.system ...", "Unsupported operand 149"), else its first line."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "Re-running")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return (useful or lines or [type(exc).__name__])[0]
