"""`gan-ddp demo`: a local Gradio page for a run's generator (`--run`) or an exported one (`--model`).

A grid for a seed (a digit picker for class-conditional models), an interpolation between two seeds, the EMA or
the raw generator where the run kept both, and the run's facts (steps, FID, data). It binds to 127.0.0.1 unless
told otherwise and prints its address. Gradio is an optional extra (`pip install 'gan-ddp[demo]'`), imported
only by `build_app` and `serve`; the drawing functions below it are plain torch and testable without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gan_ddp.errors import GanDdpError

SCALE = 3  # each 28 px image is shown 3x larger (nearest neighbour: the pixels stay visible)
PAD = 2  # px between images of a grid, as in the run's own grids
ALL_DIGITS = "all"
MAX_SEED = 2**31 - 1
MAX_IMAGES = 100
MAX_STEPS = 16


class DemoError(GanDdpError):
    """The demo cannot start: gradio missing, or a bad --run/--model (exit 2, one line)."""


@dataclass
class DemoModel:
    """What the page shows: the generator(s) by weights name ("EMA", "raw"), and facts about them."""

    generators: dict[str, nn.Module]
    conditional: bool
    z_dim: int
    title: str
    facts: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- loading
def from_run(run_dir: Path, checkpoint: Path | None = None) -> DemoModel:
    """A run's generator: the EMA and the raw weights of one checkpoint (the newest complete one by default)."""
    from gan_ddp.components.rundir import load_generator_from_run, read_run_facts
    from gan_ddp.tools.export import checkpoint_step, run_metrics

    G, cfg, ckpt_dir = load_generator_from_run(Path(run_dir), checkpoint, use_ema=True)
    generators = {"EMA": G} if cfg.ema.enabled else {}
    generators["raw"] = load_generator_from_run(Path(run_dir), ckpt_dir, use_ema=False)[0]
    step = checkpoint_step(ckpt_dir)
    facts = _facts(cfg.model.arch, G, step, run_metrics(Path(run_dir), step), read_run_facts(Path(run_dir)).get("data"))
    facts["checkpoint"] = str(ckpt_dir)
    return DemoModel(generators, bool(cfg.model.conditional), int(cfg.model.z_dim), f"run {run_dir}", facts)


def from_export(folder: Path) -> DemoModel:
    """A folder written by `gan-ddp export` (its one set of weights)."""
    from gan_ddp.tools.export import load_exported

    G, config = load_exported(Path(folder))
    meta = config.get("gan_ddp") or {}
    weights = "EMA" if meta.get("weights") == "ema" else "raw"
    facts = _facts(config["arch"], G, meta.get("step"), meta.get("metrics") or {}, meta.get("data"))
    return DemoModel({weights: G}, bool(config.get("conditional")), int(G.z_dim), f"model {folder}", facts)


def _facts(arch: str, G: nn.Module, step: int | None, metrics: dict, data: dict | None) -> dict[str, str]:
    facts = {
        "architecture": f"{arch}, {sum(p.numel() for p in G.parameters()):,} parameters, z_dim {G.z_dim}",
        "conditional": "yes" if getattr(G, "conditional", False) else "no",
        "training steps": f"{step:,}" if step is not None else "unknown",
    }
    if metrics.get("eval/fid") is not None:
        facts["FID"] = f"{metrics['eval/fid']:.4g} at step {metrics.get('step', '?')} (gan-ddp's evaluator)"
    else:
        facts["FID"] = "not measured during training (eval.every)"
    if data:
        images = data.get("images")
        count = f"{images:,}" if isinstance(images, int) else "?"
        facts["data"] = f"{data.get('dataset', '?')} {data.get('split', '?')} split, {count} images"
    return facts


# --------------------------------------------------------------------------------------------- drawing
def _labels(model: DemoModel, digit: str | int | None, n: int) -> torch.Tensor | None:
    if not model.conditional:
        return None
    if digit in (None, "", ALL_DIGITS):
        return torch.arange(n) % 10  # every digit in turn
    return torch.full((n,), int(digit), dtype=torch.long)


def _picture(images: torch.Tensor, nrow: int) -> Any:
    """Images (N, 1, 28, 28) in [-1, 1] as one PIL grid, SCALE times larger."""
    from PIL import Image
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    grid = make_grid(images.float().cpu(), nrow=nrow, padding=PAD, normalize=True, value_range=(-1, 1))
    picture = to_pil_image(grid)
    return picture.resize((picture.width * SCALE, picture.height * SCALE), Image.Resampling.NEAREST)


def grid_size(n: int, columns: int) -> tuple[int, int]:
    """(width, height) in pixels of the picture of n images in rows of `columns`."""
    rows = math.ceil(n / columns)
    return ((columns * (28 + PAD) + PAD) * SCALE, (rows * (28 + PAD) + PAD) * SCALE)


def grid_columns(model: DemoModel, n: int, digit: str | int | None) -> int:
    if model.conditional and digit in (None, "", ALL_DIGITS) and n >= 10:
        return 10  # one column per digit
    return max(1, math.ceil(math.sqrt(n)))


def _generator(model: DemoModel, weights: str | None) -> nn.Module:
    return model.generators.get(weights or "", next(iter(model.generators.values())))


def sample_grid(model: DemoModel, seed: float, n: float, digit: str | int | None = None, weights: str | None = None):
    """The picture of `n` samples for noise `seed` (what `gan-ddp sample --seed` draws)."""
    from gan_ddp.components.models import generate

    seed, n = _bounded(seed, 0, MAX_SEED, "seed"), _bounded(n, 1, MAX_IMAGES, "images")
    G = _generator(model, weights)
    images = generate(G, n, model.z_dim, seed, labels=_labels(model, digit, n))
    return _picture(images, grid_columns(model, n, digit))


def interpolation(
    model: DemoModel, seed_a: float, seed_b: float, steps: float, digit: str | int | None = None, weights=None
):
    """One row: a spherical walk from seed A's latent to seed B's (what `gan-ddp interpolate --between` draws)."""
    from gan_ddp.components import viz

    seed_a, seed_b = _bounded(seed_a, 0, MAX_SEED, "seed A"), _bounded(seed_b, 0, MAX_SEED, "seed B")
    steps = _bounded(steps, 2, MAX_STEPS, "steps")
    labels = _labels(model, 0 if digit in (None, "", ALL_DIGITS) else digit, 1)
    images = viz.latent_between(_generator(model, weights), seed_a, seed_b, steps, rows=1, labels=labels)
    return _picture(images, steps)


def _bounded(value: float | None, low: int, high: int, name: str) -> int:
    if value is None or int(value) != value or not low <= int(value) <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value}")
    return int(value)


# --------------------------------------------------------------------------------------------- the page
def build_app(model: DemoModel):
    """The Gradio Blocks of the page (gradio imported here)."""
    import gradio as gr

    def guarded(fn):
        def run(*args):
            try:
                return fn(*args)
            except ValueError as exc:  # out-of-range input: shown on the page, the server goes on
                raise gr.Error(str(exc)) from None

        return run

    weights = list(model.generators)
    digits = [ALL_DIGITS] + [str(d) for d in range(10)]
    with gr.Blocks(title="gan-ddp demo", analytics_enabled=False) as app:
        gr.Markdown(f"# gan-ddp: {model.title}")
        gr.Markdown("\n".join(f"- **{k}**: {v}" for k, v in model.facts.items()), elem_id="facts")
        with gr.Row():
            which = gr.Radio(weights, value=weights[0], label="generator", visible=len(weights) > 1, elem_id="weights")
            digit = gr.Dropdown(digits, value=ALL_DIGITS, label="digit", visible=model.conditional, elem_id="digit")
        with gr.Tab("Samples"):
            with gr.Row():
                seed = gr.Number(0, label="seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
                n = gr.Slider(1, MAX_IMAGES, value=16, step=1, label="images", elem_id="n")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            grid = gr.Image(label="samples", type="pil", format="png", interactive=False, elem_id="grid")
        with gr.Tab("Interpolation"):
            with gr.Row():
                seed_a = gr.Number(0, label="seed A", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed_a")
                seed_b = gr.Number(1, label="seed B", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed_b")
                steps = gr.Slider(2, MAX_STEPS, value=10, step=1, label="steps", elem_id="steps")
            walk = gr.Button("Interpolate", variant="primary", elem_id="interpolate")
            row = gr.Image(label="interpolation", type="pil", format="png", interactive=False, elem_id="row")
        generate.click(guarded(lambda *a: sample_grid(model, *a)), [seed, n, digit, which], grid)
        walk.click(guarded(lambda *a: interpolation(model, *a)), [seed_a, seed_b, steps, digit, which], row)
    return app


def serve(model: DemoModel, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Start the page and print its address; returns when interrupted (Ctrl-C)."""
    import gradio as gr

    app = build_app(model)
    # Local fonts: the default theme would fetch Google Fonts, which an offline machine cannot reach.
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    try:
        _, url, _ = app.launch(
            server_name=host,
            server_port=port,
            share=False,
            quiet=True,
            prevent_thread_lock=True,
            ssr_mode=False,
            theme=theme,
        )
    except OSError as exc:  # port in use, address not available
        raise DemoError(f"cannot serve on {host}:{port}: {exc}") from None
    where = "this machine only" if host in ("127.0.0.1", "localhost", "::1") else "reachable from the network"
    print(f"gan-ddp demo: {model.title} at {url} ({where}; Ctrl-C stops)", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()


def check_gradio() -> None:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise DemoError("demo needs gradio, which is not installed: pip install 'gan-ddp[demo]'")
