"""Checkpoints of gan-ddp before format 2 (format 1): the one place a checkpoint file meets an unpickler.

Format 1 was Accelerate's `save_state`: weights and the EMA in safetensors (read as format 2 reads them), the
optimizers (`optimizer.bin`, `optimizer_1.bin`), the fp16 scaler (`scaler.pt`) and each process's RNG states
(`random_states_<rank>.pkl`) as pickles. They are read only with torch's restricted unpickler
(`compat.restricted_torch_load`, torch.load weights_only=True), and only on torch >= 2.6, which fixed
CVE-2025-32434 (`compat.weights_only_is_safe`); elsewhere such a checkpoint is refused before any file is read.
A resume passes `load_format_1` to `checkpoint.load_training_state`, which calls it for a `trainer_state.json`
without a "format".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gan_ddp.runtime import compat
from gan_ddp.runtime.checkpoint import MODELS, CheckpointError, TrainingState, extra_file, read_tensors, reason

LEGACY_OPTIMIZERS = ("optimizer.bin", "optimizer_1.bin")
LEGACY_SCALER = "scaler.pt"


def rng_from_accelerate(states: dict[str, Any]) -> dict[str, Any]:
    """The dict Accelerate's save_state pickled into random_states_<rank>.pkl, as `checkpoint.set_rng_state`
    takes it."""
    import numpy as np

    name, keys, pos, has_gauss, cached = states["numpy_random_seed"]
    version, internal, gauss = states["random_state"]
    cuda = states.get("torch_cuda_manual_seed") or []
    return {
        "python": (int(version), tuple(int(i) for i in internal), gauss),
        "numpy": (str(name), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)),
        "torch": torch.as_tensor(states["torch_manual_seed"], dtype=torch.uint8),
        "cuda": [torch.as_tensor(s, dtype=torch.uint8) for s in (cuda if isinstance(cuda, list) else [cuda])],
    }


def load_format_1(directory: Path, rank: int, saved_world: int, extras: tuple[str, ...]) -> TrainingState:
    """A checkpoint of gan-ddp before format 2, for process `rank`. torch.load(weights_only=True) is torch's
    restricted unpickler (no imports beyond tensors and plain containers), but before torch 2.6 it could be
    made to run code (CVE-2025-32434): there we refuse."""
    if not compat.weights_only_is_safe():
        raise CheckpointError(
            f"{directory}: written by an earlier gan-ddp (optimizer and RNG state as pickles), which torch "
            f"{torch.__version__} cannot read safely (torch.load weights_only=True is safe from torch 2.6), so "
            "nothing in it was read: resume it once on the default stack (it writes the current format at the "
            "next checkpoint), or start a new run.dir"
        )

    def unpickle(path: Path) -> Any:
        if not path.is_file():
            raise CheckpointError(f"{directory}: {path.name} is missing")
        try:
            return compat.restricted_torch_load(path)
        except Exception as exc:
            raise CheckpointError(
                f"{path}: refused by torch's restricted unpickler (torch.load weights_only=True): {reason(exc)}"
            ) from None

    models = [read_tensors(directory / name) for name in MODELS]
    optimizers = [unpickle(directory / name) for name in LEGACY_OPTIMIZERS]
    for path, loaded in zip(LEGACY_OPTIMIZERS, optimizers, strict=True):
        if not (isinstance(loaded, dict) and {"state", "param_groups"} <= set(loaded)):
            raise CheckpointError(f"{directory / path}: not an optimizer state")
    scaler = unpickle(directory / LEGACY_SCALER) if (directory / LEGACY_SCALER).is_file() else None
    rng = None
    if rank < saved_world:
        path = directory / f"random_states_{rank}.pkl"
        try:
            rng = rng_from_accelerate(unpickle(path))
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path}: not an RNG state ({reason(exc)})") from None
    return TrainingState(models, optimizers, scaler, rng, {n: read_tensors(directory / extra_file(n)) for n in extras})
