"""A finished (or interrupted) run directory, read back: its config and its generator.

What `sample`, `interpolate` and `eval --run` need from a run lives here, below the trainer, so those
commands and the evaluation never import the training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from gan_ddp.components.models import build_models
from gan_ddp.config import Config, config_from_dict
from gan_ddp.errors import ConfigError, MissingRunFileError, one_line
from gan_ddp.runtime import checkpoint as ckpt
from gan_ddp.runtime import guard

CONFIG_FILE = "config.yaml"


def read_run_config(run_dir: Path) -> Config:
    """The resolved config a run wrote at start-up (its `resolved` facts are not part of the tree)."""
    return config_from_dict(_read_yaml(Path(run_dir) / CONFIG_FILE))


def read_run_facts(run_dir: Path) -> dict[str, Any]:
    """What the run decided and read, as `config.yaml` records it under `resolved` (the data's source, split,
    number of images and sha256, precision, world size, torch version); {} for a run written before it."""
    return dict(_read_yaml(Path(run_dir) / CONFIG_FILE).get("resolved") or {})


def load_generator_from_run(
    run_dir: Path, checkpoint: Path | None = None, use_ema: bool = True
) -> tuple[nn.Module, Config, Path]:
    """(G in eval mode on CPU, config, checkpoint dir): the newest complete checkpoint unless one is named.
    With `use_ema`, the generator EMA's weights where the run kept one, else the raw generator's."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if checkpoint is None:
        checkpoint = ckpt.find_latest(run_dir / "checkpoints")
        if checkpoint is None:
            raise ckpt.CheckpointError(f"{run_dir}: no complete checkpoint under checkpoints/")
    else:
        ckpt.verify(checkpoint)
    generator, _ = build_models(cfg.model)
    ema = ckpt.load_ema(checkpoint) if use_ema else None  # safetensors only: reading it runs no code
    if ema is not None:
        prefix, path = "ema.shadow.", checkpoint / ckpt.EMA
        weights = {k[len(prefix) :]: v for k, v in ema.items() if k.startswith(prefix)}
    else:
        path = checkpoint / ckpt.MODELS[0]
        weights = ckpt.read_tensors(path)
    try:
        generator.load_state_dict(weights)
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"{path}: does not fit the run's generator ({one_line(exc)[:200]})") from None
    names, bad = guard.nonfinite_tensors({"G": generator})
    if bool(bad.any()):  # written before the divergence guard existed: it would give blank images
        raise ckpt.CheckpointError(
            f"{checkpoint}: non-finite weights ({names[int(bad.argmax())]}): the run diverged before this "
            "checkpoint; pick an earlier one with --checkpoint"
        )
    return generator.eval(), cfg, checkpoint


def _read_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    if not path.is_file():
        raise MissingRunFileError(f"{path} not found: is this a gan-ddp run directory?")
    try:  # OmegaConf reads YAML with a safe loader: a `!!python/...` tag is an error, never a call
        loaded = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as exc:  # yaml.YAMLError, OmegaConf's own errors, a decoding error
        raise ConfigError(f"{path}: not a readable run config ({one_line(exc)[:200]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: not a run config (a YAML mapping is expected)")
    return loaded  # type: ignore[return-value]
