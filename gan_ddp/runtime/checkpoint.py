"""Atomic, complete, verifiable checkpoints.

Layout of `<run>/checkpoints/step_XXXXXXXX/` (format 2): no pickles at all. Tensors are in safetensors
(`model.safetensors` G, `model_1.safetensors` D, `ema.safetensors`, `optimizer.safetensors` and
`optimizer_1.safetensors` the optimizers' state tensors), everything else in JSON (`optimizer*.json` their
hyper-parameters and step counts, `scaler.json` the fp16 gradient scaler, `rng_<rank>.json` each process's
Python, NumPy, torch and CUDA generator states as integer lists, `trainer_state.json` step, data position,
model signature, and last `manifest.json` with the size and sha256 of every file). Everything is written into
a `.tmp-*` sibling first and renamed only when every process is done and the manifest is on disk, so a
directory named `step_*` with a manifest that matches its files is complete.

Why our own files rather than `accelerator.save_state`: Accelerate pickles the optimizers, the scaler and the
RNG states, and below torch 2.4 (the K80 stack) loads them with a plain, code-running `torch.load`. A
safetensors file is a JSON header and raw bytes, and JSON is data: reading a checkpoint from a stranger can
fail, but never runs code, on any torch. Checkpoints of earlier versions (format 1: Accelerate's pickles) are
read only with torch's restricted unpickler, and only on torch >= 2.6 (`compat.weights_only_is_safe`):
`checkpoint_legacy`, the one reader of pickles, apart from this format.

Beyond G, D and the optimisers a checkpoint holds named *extras*: sets of tensors, each in `<name>.safetensors`
(the EMA's is `ema`). `save(extras={name: tensors})` writes them, `load_training_state(extras=(name, ...))`
reads them back (a missing one is an error naming it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gan_ddp.errors import GanDdpError
from gan_ddp.runtime.fsutil import atomic_write

MANIFEST = "manifest.json"
STATE = "trainer_state.json"
FORMAT = 2  # trainer_state.json's "format"; checkpoints without it are format 1 (Accelerate's pickles)
MODELS = ("model.safetensors", "model_1.safetensors")  # G, D: the names Accelerate's save_state used
OPTIMIZERS = ("optimizer", "optimizer_1")  # + .safetensors (state tensors) and .json (everything else)
SCALER = "scaler.json"
EMA = "ema.safetensors"  # the extra named "ema"
PREFIX = "step_"
# Fault injection for tests: die (as `kill -9` would) after the first files of a checkpoint are written.
CRASH_ENV = "GAN_DDP_TEST_CRASH_IN_SAVE"


class CheckpointError(GanDdpError, RuntimeError):
    """A checkpoint that is incomplete, corrupt or from another model; one line naming it."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def extra_file(name: str) -> str:
    """The file of a checkpoint's extra `name` (`ema` -> ema.safetensors)."""
    return f"{name}.safetensors"


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


def write_json(path: Path, data: Any) -> None:
    """Inside a `.tmp-*` checkpoint directory (atomic as a whole): a plain write. Floats are written as
    Python's repr, which reads back to the same double."""
    path.write_text(json.dumps(data, separators=(",", ":")))


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


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


# What a resume reads of trainer_state.json, and the JSON types it must have.
STATE_FIELDS: dict[str, type] = {
    "step": int,
    "world_size": int,
    "global_batch": int,
    "model": dict,
    "ema": bool,
    "skipped": list,
    "window": dict,
}


def read_state(directory: Path) -> dict[str, Any]:
    """trainer_state.json, checked for the fields a resume reads (a foreign or doctored file: one line)."""
    path = directory / STATE
    state = read_json(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a trainer state (a JSON object is expected) {NO_CODE}")
    for key, kind in STATE_FIELDS.items():
        if not isinstance(state.get(key), kind) or (kind is int and isinstance(state[key], bool)):
            raise CheckpointError(f"{path}: not a trainer state ({key!r} missing or not a {kind.__name__}) {NO_CODE}")
    if state["step"] < 0 or state["world_size"] < 1:
        raise CheckpointError(f"{path}: step {state['step']}, world_size {state['world_size']}: out of range")
    return state


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


def save(
    accelerator,
    root: Path,
    step: int,
    state: dict[str, Any],
    extras: dict[str, dict[str, torch.Tensor]] | None,
    models: tuple[torch.nn.Module, ...] = (),
    optimizers: tuple[torch.optim.Optimizer, ...] = (),
    scaler: Any = None,
) -> Path:
    """Collective: every process must call it. Returns the final directory. `models` (G, D, unwrapped),
    `optimizers` (theirs) and `scaler` (fp16's, or None) are written by the main process, each process's
    RNG states by itself; `extras` (name -> tensors: the EMA, ...) each into `<name>.safetensors`.

    A failure while writing (disk full, read-only filesystem, permissions) removes the half-written
    `.tmp-*` directory and raises an OSError that names it and its errno, whatever the library that
    failed said; earlier checkpoints are untouched (rotation runs only after a complete save)."""
    from gan_ddp.runtime.faults import as_os_error

    tmp = root / f".tmp-{step_dir_name(step)}"
    try:
        return _save(accelerator, root, step, state, extras or {}, models, optimizers, scaler)
    except BaseException as exc:
        error = as_os_error(exc, tmp) if isinstance(exc, Exception) else None  # reads free space: before cleaning
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if error is None or error is exc:
            raise
        raise error from exc


def _save(accelerator, root, step, state, extras, models, optimizers, scaler) -> Path:
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for model, name in zip(models, MODELS, strict=True):
            _save_tensors(model.state_dict(), tmp / name)
        for optimizer, name in zip(optimizers, OPTIMIZERS, strict=True):
            tensors, rest = split_optimizer_state(optimizer.state_dict())
            _save_tensors(tensors, tmp / f"{name}.safetensors")
            write_json(tmp / f"{name}.json", rest)
        if scaler is not None:
            write_json(tmp / SCALER, scaler.state_dict())
    write_json(tmp / rng_name(accelerator.process_index), rng_state())
    if os.environ.get(CRASH_ENV) == str(step):
        os._exit(137)  # the test's `kill -9` in the middle of a save, deterministic
    if accelerator.is_main_process:
        for name, tensors in extras.items():
            if tensors:
                _save_tensors(tensors, tmp / extra_file(name))
        write_json(tmp / STATE, {**state, "format": FORMAT})
    accelerator.wait_for_everyone()  # every process's RNG file is on disk
    if accelerator.is_main_process:
        write_manifest(tmp)
        if final.exists():  # a complete checkpoint of this step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    accelerator.wait_for_everyone()
    return final


def load_ema(directory: Path) -> dict[str, torch.Tensor] | None:
    path = directory / EMA
    return read_tensors(path) if path.is_file() else None


def rng_name(rank: int) -> str:
    return f"rng_{rank}.json"


# ------------------------------------------------------------------------------ state <-> files
def split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state_dict as (tensors for safetensors, the rest for JSON). A tensor's key says where
    it goes back: `state.<param id>.<slot>` or `param_groups.<index>.<key>`."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"state": {}, "param_groups": []}
    for pid, slots in state["state"].items():
        rest["state"][str(pid)] = {}
        for slot, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{slot}"] = value
            else:
                rest["state"][str(pid)][slot] = value
    for i, group in enumerate(state["param_groups"]):
        plain = {}
        for key, value in group.items():
            if torch.is_tensor(value):
                tensors[f"param_groups.{i}.{key}"] = value
            else:
                plain[key] = list(value) if isinstance(value, tuple) else value
        rest["param_groups"].append(plain)
    return tensors, rest


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `split_optimizer_state`; ValueError/KeyError/TypeError for anything malformed."""
    state = {int(pid): dict(slots) for pid, slots in rest["state"].items()}
    groups = [
        {k: v if k == "params" or not isinstance(v, list) else tuple(v) for k, v in group.items()}
        for group in rest["param_groups"]
    ]
    for key, value in tensors.items():
        where, index, name = key.split(".", 2)
        if where == "state":
            state.setdefault(int(index), {})[name] = value
        elif where == "param_groups":
            groups[int(index)][name] = value
        else:
            raise ValueError(f"unexpected tensor {key!r}")
    for group in groups:
        if not all(isinstance(p, int) for p in group["params"]):
            raise ValueError("param_groups' params are not parameter indices")
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, Any]:
    """This process's random generators as JSON-ready integer lists: what an exact resume needs (dropout and
    anything else drawing from the global generators; the noise and the data order are seeded per step)."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _rng_from_json(state: dict[str, Any]) -> dict[str, Any]:
    """Check and convert `rng_state`'s JSON into the values the generators take (raises on anything else)."""
    import numpy as np

    version, internal, gauss = state["python"]
    name, keys, pos, has_gauss, cached = state["numpy"]
    if not (isinstance(version, int) and len(internal) == 625 and all(isinstance(i, int) for i in internal)):
        raise ValueError("python: not a random.getstate()")
    cpu = torch.tensor(state["torch"], dtype=torch.uint8)
    return {
        "python": (version, tuple(internal), None if gauss is None else float(gauss)),
        "numpy": (str(name), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)),
        "torch": cpu,
        "cuda": [torch.tensor(s, dtype=torch.uint8) for s in state.get("cuda", [])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


READ_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError, SafetensorError)
NO_CODE = "(read as data only: safetensors and JSON, no pickle, so nothing in it ran)"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({reason(exc)}) {NO_CODE}") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except READ_ERRORS as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({reason(exc)}) {NO_CODE}") from None


@dataclass
class TrainingState:
    """Everything of a checkpoint a resume applies, read and checked before anything is changed."""

    models: list[dict[str, torch.Tensor]]
    optimizers: list[dict[str, Any]]
    scaler: dict[str, Any] | None
    rng: dict[str, Any] | None  # this process's; None when the checkpoint had fewer processes
    extras: dict[str, dict[str, torch.Tensor]]  # name -> tensors, for the names asked for


def load_training_state(
    directory: Path,
    rank: int,
    saved_world: int,
    extras: Iterable[str] = (),
    format_1: Callable[[Path, int, int, tuple[str, ...]], TrainingState] | None = None,
) -> TrainingState:
    """Read a checkpoint (verified before) for process `rank`, with the `extras` named (e.g. ("ema",));
    CheckpointError naming the file that is missing or malformed. No file is given to an unpickler. A
    checkpoint of an earlier gan-ddp (format 1) goes to `format_1` (`checkpoint_legacy.load_format_1`, the
    one reader that meets pickles, which imports this module: hence passed in, not imported)."""
    state = read_state(directory)
    fmt = state.get("format", 1) if isinstance(state, dict) else None
    if fmt == 1:
        if format_1 is None:
            raise CheckpointError(f"{directory}: written by an earlier gan-ddp (format 1), not read here")
        return format_1(directory, rank, saved_world, tuple(extras))
    if fmt != FORMAT:
        raise CheckpointError(f"{directory / STATE}: checkpoint format {fmt!r}; this gan-ddp reads {FORMAT}")

    def need(name: str) -> Path:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        return path

    models = [read_tensors(need(name)) for name in MODELS]
    optimizers = []
    for name in OPTIMIZERS:
        tensors, rest = read_tensors(need(f"{name}.safetensors")), read_json(need(f"{name}.json"))
        try:
            optimizers.append(join_optimizer_state(tensors, rest))
        except READ_ERRORS as exc:
            raise CheckpointError(
                f"{directory / name}.json: not an optimizer state ({reason(exc)}) {NO_CODE}"
            ) from None
    scaler = read_json(directory / SCALER) if (directory / SCALER).is_file() else None
    if scaler is not None and not (isinstance(scaler, dict) and isinstance(scaler.get("scale", 0.0), float)):
        raise CheckpointError(f"{directory / SCALER}: not a gradient scaler state {NO_CODE}")
    rng = None
    if rank < saved_world:
        path = directory / rng_name(rank)
        if not path.is_file():
            raise CheckpointError(
                f"{directory}: {path.name} is missing (process {rank}'s RNG state; exact resume needs it)"
            )
        try:
            rng = _rng_from_json(read_json(path))
        except READ_ERRORS as exc:
            raise CheckpointError(f"{path}: not an RNG state ({reason(exc)}) {NO_CODE}") from None
    return TrainingState(models, optimizers, scaler, rng, {n: read_tensors(need(extra_file(n))) for n in extras})


def reason(exc: BaseException) -> str:
    """The informative line of a library's multi-paragraph error (torch's weights_only error: "Trying to
    load unsupported GLOBAL posix.system ...", "Unsupported operand 149"), else its first line, cut short."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "Re-running")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    return (useful or lines or [type(exc).__name__])[0][:300]
