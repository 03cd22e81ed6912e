"""`gan-ddp export`: a run's generator as a Hugging Face Hub folder, usable without gan-ddp's run files.

The folder (what `huggingface_hub` and the Hub expect of a `PyTorchModelHubMixin` model):

    model.safetensors   the generator's weights (the EMA's by default)
    config.json         the class's __init__ arguments (what `from_pretrained` rebuilds it from), plus `arch`
                        and `gan_ddp`: the run's facts (step, weights, the data it was trained on, metrics)
    README.md           the model card: metadata block (library, licence, pipeline, dataset, model-index with
                        the measured metrics), a sample grid, the facts, how to load and share it
    samples.png         64 samples (conditional: one row per class), noise seed 0

`MLPGenerator.from_pretrained(DIR)` / `DCGANGenerator.from_pretrained(DIR)` load it (`load_exported` picks the
class from `arch`). The weights are read with `rundir.load_generator_from_run`, the one reader of a run's
checkpoints that `sample` and `eval` use too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gan_ddp.errors import GanDdpError, one_line

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
GRID_NAME = "samples.png"
GRID_SEED = 0
GRID_COLUMNS = 8
# The Hub's copies of the datasets gan-ddp trains on (the card's `datasets:` metadata).
HUB_DATASETS = {"mnist": "ylecun/mnist", "fashion_mnist": "zalando-datasets/fashion_mnist"}
# Metrics a run's evaluation lines may hold, as the card names them (keys: eval_metrics.METRIC_KEYS & co).
CARD_METRICS = {
    "eval/fid": "FID",
    "eval/kid": "KID",
    "eval/precision": "precision",
    "eval/recall": "recall",
    "eval/coverage": "classes covered (of 10)",
    "eval/agreement": "class agreement",
    "eval/agreement_min": "class agreement, worst digit",
}


class ExportError(GanDdpError):
    """A bad --out folder, or a folder that is not an exported generator (exit 2, one line)."""


# ------------------------------------------------------------------------------------------------ export
def export_run(run_dir: Path, out: Path, checkpoint: Path | None = None, use_ema: bool = True) -> Path:
    """Write the Hub folder `out` for the run's generator (newest complete checkpoint unless one is named)."""
    from gan_ddp.components.rundir import load_generator_from_run, read_run_facts

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: a file is in the way; name a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"--out {out}: the folder is not empty; name a new folder (nothing is overwritten)")
    G, cfg, ckpt_dir = load_generator_from_run(Path(run_dir), checkpoint, use_ema=use_ema)
    step = checkpoint_step(ckpt_dir)
    facts = read_run_facts(Path(run_dir))
    ema = use_ema and cfg.ema.enabled
    metrics = run_metrics(Path(run_dir), step)
    meta = {
        "step": step,
        "weights": "ema" if ema else "raw",
        "ema_decay": cfg.ema.decay if ema else None,
        "loss": cfg.loss.kind,
        "data": facts.get("data") or {"dataset": cfg.data.dataset, "split": cfg.data.split},
        "metrics": metrics,
        "metrics_weights": "ema" if cfg.ema.enabled else "raw",  # evaluation during training uses the EMA
        "torch": facts.get("torch", str(torch.__version__)),
    }

    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(_model_card(G, cfg, meta))  # first: save_pretrained keeps an existing card
    G.save_pretrained(out)  # model.safetensors, config.json (the __init__ arguments)
    config = json.loads((out / CONFIG_NAME).read_text())
    config.update(arch=cfg.model.arch, gan_ddp=meta)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _save_sample_grid(G, out / GRID_NAME)
    return ckpt_dir


def checkpoint_step(ckpt_dir: Path) -> int | None:
    from gan_ddp.runtime import checkpoint as ckpt

    try:
        return int(ckpt.read_state(ckpt_dir)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_metrics(run_dir: Path, step: int | None) -> dict[str, Any]:
    """The newest evaluation line of metrics.jsonl at or before `step` (eval.every during training): {} if none."""
    from gan_ddp.components.viz import read_metrics

    try:
        rows = read_metrics(run_dir)
    except GanDdpError:
        return {}
    evals = [r for r in rows if "eval/fid" in r and (step is None or r.get("step", 0) <= step)]
    if not evals:
        return {}
    last = evals[-1]
    return {"step": last.get("step"), **{k: v for k, v in last.items() if k.startswith("eval/") and v is not None}}


def grid_inputs(G: nn.Module, seed: int = GRID_SEED, columns: int = GRID_COLUMNS) -> tuple[torch.Tensor, Any]:
    """(z, labels) of the card's grid: 8 x 8 samples, or for a conditional G one row per class."""
    from gan_ddp.components.models import class_grid_inputs

    if getattr(G, "conditional", False):
        return class_grid_inputs(columns, G.z_dim, seed)
    return torch.randn(columns * columns, G.z_dim, generator=torch.Generator().manual_seed(seed)), None


def _save_sample_grid(G: nn.Module, path: Path) -> None:
    from gan_ddp.components.viz import save_grid

    z, labels = grid_inputs(G)
    with torch.no_grad():
        images = G(z) if labels is None else G(z, labels)
    save_grid(images, path, nrow=GRID_COLUMNS)


# ------------------------------------------------------------------------------------------------ card
def _model_card(G: nn.Module, cfg: Any, meta: dict[str, Any]) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    data = meta["data"]
    dataset = data.get("dataset", cfg.data.dataset)
    arch, conditional = cfg.model.arch, bool(cfg.model.conditional)
    cls = type(G).__name__
    name = f"gan-ddp-{dataset}-{arch}{'-conditional' if conditional else ''}"
    metrics = meta["metrics"]
    n_samples = f", {int(metrics['eval/n']):,} samples" if metrics.get("eval/n") else ""
    results = [
        EvalResult(
            task_type="unconditional-image-generation",
            dataset_type=HUB_DATASETS.get(dataset, dataset),
            dataset_name=f"{dataset} ({data.get('split', '?')} split)",
            metric_type=key.split("/", 1)[1],
            metric_value=float(metrics[key]),
            metric_name=f"{label} (gan-ddp evaluator{n_samples})",
        )
        for key, label in CARD_METRICS.items()
        if isinstance(metrics.get(key), (int, float)) and math.isfinite(metrics[key])
    ]
    card = ModelCardData(
        library_name="gan-ddp",
        license="mit",
        pipeline_tag="unconditional-image-generation",
        tags=sorted({"gan", "gan-ddp", "mnist", "pytorch_model_hub_mixin", "model_hub_mixin", arch}),
        datasets=[HUB_DATASETS[dataset]] if dataset in HUB_DATASETS else None,
        model_name=name,
        eval_results=results or None,
    )
    n_params = sum(p.numel() for p in G.parameters())
    rows = [
        ("architecture", f"`{arch}` (`{cls}`), {n_params:,} parameters, z_dim {G.z_dim}"),
        ("conditional", "yes: `G(z, labels)`, labels 0-9" if conditional else "no: `G(z)`"),
        ("weights", "generator EMA" if meta["weights"] == "ema" else "raw generator (no EMA)"),
        ("training steps", f"{meta['step']:,}" if meta["step"] is not None else "unknown"),
        ("loss", f"`{meta['loss']}`"),
        ("data", _describe_data(data)),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    body = [
        f"# {name}",
        "",
        f"{'Class-conditional' if conditional else 'Unconditional'} {arch} GAN generator for 28×28 {dataset} images, "
        "trained with gan-ddp and exported by `gan-ddp export`.",
        "",
        f"![samples, noise seed {GRID_SEED}{': one row per class' if conditional else ''}]({GRID_NAME})",
        "",
        "| | |",
        "|---|---|",
        table,
        "",
        _metrics_section(metrics, meta),
        "## Use",
        "",
        "```python",
        "import torch",
        f"from gan_ddp.components.models import {cls}  # the gan-ddp package",
        "",
        f'G = {cls}.from_pretrained("path/to/this/folder")  # or "user/repo" on the Hub; eval mode, on CPU',
        "z = torch.randn(16, G.z_dim, generator=torch.Generator().manual_seed(0))",
        (
            "images = G(z, torch.full((16,), 7))  # sevens: (16, 1, 28, 28) in [-1, 1]"
            if conditional
            else "images = G(z)  # (16, 1, 28, 28) in [-1, 1]"
        ),
        "```",
        "",
        "`gan-ddp demo --model path/to/this/folder` shows it in a browser. To share it, upload the folder as it "
        "is (card, grid and all): `hf upload user/repo path/to/this/folder` or "
        "`huggingface_hub.upload_folder(repo_id=..., folder_path=...)`. "
        "(`G.push_to_hub(...)` works too, but writes the mixin's generic card instead of this one.)",
        "",
    ]
    return f"---\n{card.to_yaml()}\n---\n\n" + "\n".join(body)


def _describe_data(data: dict[str, Any]) -> str:
    parts = [f"`{data.get('dataset', '?')}`, {data.get('split', '?')} split"]
    if data.get("images"):
        parts.append(f"{int(data['images']):,} images")
    if data.get("source"):
        parts.append(f"from {data['source']}")
    if data.get("sha256"):
        parts.append(f"sha256 `{str(data['sha256'])[:16]}…`")
    return ", ".join(parts)


def _metrics_section(metrics: dict[str, Any], meta: dict[str, Any]) -> str:
    if not metrics:
        return (
            "No evaluation was recorded during training (`eval.every`); "
            "`gan-ddp eval --run RUN_DIR` measures one from the run.\n"
        )
    lines = [
        f"## Metrics (step {metrics.get('step')}, {'EMA' if meta['metrics_weights'] == 'ema' else 'raw'} generator)",
        "",
        "Measured during training on gan-ddp's own evaluator (a small CNN classifier trained on the data, not "
        "Inception): compare only with other gan-ddp runs scored the same way.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {label} | {metrics[key]:.4g} |" for key, label in CARD_METRICS.items() if key in metrics]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ load
def read_exported_config(folder: Path) -> dict[str, Any]:
    """config.json of an exported generator, checked: one line naming what is wrong otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"--model {folder}: no such folder")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise ExportError(f"--model {folder}: no {name}; is this a folder written by `gan-ddp export`?")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"--model {folder}: {CONFIG_NAME} is unreadable: {one_line(exc)}") from None
    if not isinstance(config, dict) or "arch" not in config:
        raise ExportError(f"--model {folder}: {CONFIG_NAME} names no arch; was it written by `gan-ddp export`?")
    return config


def load_exported(folder: Path) -> tuple[nn.Module, dict[str, Any]]:
    """(G in eval mode, config.json) of a folder written by `export_run`, built by the class its `arch` names."""
    from gan_ddp.components.models import ARCHS

    config = read_exported_config(folder)
    if config["arch"] not in ARCHS:
        raise ExportError(f"--model {folder}: arch {config['arch']!r} is not one of {', '.join(ARCHS.names())}")
    try:
        G = ARCHS[config["arch"]].generator.from_pretrained(folder)
    except Exception as exc:  # a config the class rejects, missing or misshapen tensors, a corrupt file
        raise ExportError(f"--model {folder}: cannot load the generator: {one_line(exc, named=True)}") from None
    return G, config
