"""Visualisation of a training run: metric plots, a progress GIF of sample grids, latent walks.

Heavy or display-related libraries (matplotlib, imageio, PIL, torchvision) are imported inside the
functions that need them so that ``import gan_ddp.components.viz`` stays cheap for the trainer.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gan_ddp.errors import MissingRunFileError, UsageError

__all__ = [
    "latent_between",
    "latent_sweep",
    "make_animation",
    "plot_metrics",
    "read_metrics",
    "save_grid",
    "slerp",
]

METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
PLOTS_DIR = "plots"
# Small figures keep PNGs that end up committed next to a run at a few tens of KB.
FIGSIZE = (7.0, 4.0)
DPI = 100
_GRID_RE = re.compile(r"^step_(\d+)\.png$")
# Upper bound on one forward pass so a long sweep cannot exhaust device memory.
_GEN_BATCH = 1024


# --------------------------------------------------------------------------------------------- metrics


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Parse a metrics.jsonl file (or a run directory containing one) into a list of dicts.

    Blank lines are ignored; an unparsable last line (crash mid-write) is skipped silently, an unparsable
    line elsewhere (e.g. a truncated line that a resumed run appended to) is skipped with a warning.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise MissingRunFileError(f"metrics file not found: {path}")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            if i != last:
                warnings.warn(f"{path}:{i + 1}: skipping malformed metrics line", stacklevel=2)
            continue
        rows.append(row)
    return rows


def _series(rows: Iterable[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry both ``step`` and a numeric ``key``."""
    xs: list[float] = []
    ys: list[float] = []
    for row in rows:
        step, value = row.get("step"), row.get(key)
        # bool is an int subclass; a flag logged under a metric name must not be plotted as 0/1.
        if isinstance(value, bool) or not isinstance(value, int | float) or not isinstance(step, int | float):
            continue
        xs.append(float(step))
        ys.append(float(value))
    return xs, ys


def _new_axes(title: str) -> tuple[Any, Any]:
    # Figure + FigureCanvasAgg directly (instead of pyplot) renders headless with the Agg backend without
    # switching the process-wide backend and without pyplot's global figure registry leaking figures.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    return path


def plot_metrics(run_dir: str | Path) -> list[Path]:
    """Write ``plots/losses.png``, ``plots/scores.png`` (if scores are logged) and ``plots/fid.png`` (if
    ``eval/fid`` is logged) under ``run_dir``; return the written paths."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    rows = read_metrics(metrics_path)
    loss_keys = [k for k in ("loss/d", "loss/g") if _series(rows, k)[0]]
    if not loss_keys:
        # A FileNotFoundError (not ValueError) so callers handle "nothing to plot yet" like a missing file.
        raise MissingRunFileError(f"no loss/d or loss/g lines in metrics file: {metrics_path}")
    out_dir = run_dir / PLOTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    name = run_dir.resolve().name
    written: list[Path] = []

    fig, ax = _new_axes(f"losses ({name})")
    for key in loss_keys:
        ax.plot(*_series(rows, key), label=key, linewidth=1)
    ax.set_ylabel("loss")
    ax.legend()
    written.append(_save(fig, out_dir / "losses.png"))

    score_labels = {"score/real": "D(x) (score/real)", "score/fake": "D(G(z)) (score/fake)"}
    score_series = {k: _series(rows, k) for k in score_labels}
    if any(xs for xs, _ in score_series.values()):
        fig, ax = _new_axes(f"discriminator scores ({name})")
        for key, (xs, ys) in score_series.items():
            if xs:
                ax.plot(xs, ys, label=score_labels[key], linewidth=1)
        # An optimal D against a perfect G outputs 0.5 everywhere; drift from it shows who is winning.
        ax.axhline(0.5, linestyle="--", color="gray", linewidth=1, label="equilibrium")
        ax.set_ylim(0.0, 1.0)
        ax.set_ylabel("D output")
        ax.legend()
        written.append(_save(fig, out_dir / "scores.png"))

    fid_steps, fid_values = _series(rows, "eval/fid")
    if fid_steps:
        fig, ax = _new_axes(f"FID ({name})")
        ax.plot(fid_steps, fid_values, marker="o", linewidth=1, label="eval/fid")
        ax.set_ylabel("FID (lower is better)")
        ax.legend()
        written.append(_save(fig, out_dir / "fid.png"))
    return written


# ------------------------------------------------------------------------------------------- animation


def _sample_grids(samples_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``step_*.png`` grid, in numeric step order."""
    found = []
    for p in samples_dir.glob("step_*.png"):
        m = _GRID_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    # Numeric sort: zero padding makes lexical order agree, but a step beyond 8 digits would not.
    return sorted(found)


def make_animation(run_dir: str | Path, out: str | Path | None = None, fps: float = 4) -> Path:
    """Assemble ``samples/step_*.png`` into a looping GIF (default ``samples/progress.gif``), one frame per
    grid in step order, each with a "step N" header band; return the GIF path."""
    import imageio.v3 as iio
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    if fps <= 0:
        raise UsageError(f"fps must be > 0, got {fps}")
    run_dir = Path(run_dir)
    samples_dir = run_dir / SAMPLES_DIR
    grids = _sample_grids(samples_dir)
    if not grids:
        raise MissingRunFileError(f"no sample grids {samples_dir / 'step_*.png'} to animate")
    out_path = Path(out) if out is not None else samples_dir / "progress.gif"

    images = []
    gray = True
    for _, p in grids:
        with Image.open(p) as im:
            # Keep the GIF grayscale (smaller, no palette dithering) unless some grid really is colour.
            gray = gray and im.mode in ("1", "L", "LA")
            images.append(im.convert("RGB"))
    mode = "L" if gray else "RGB"

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new(mode, (1, 1)))
    text_h = max(probe.textbbox((0, 0), f"step {step:,}", font=font)[3] for step, _ in grids)
    band = text_h + 6
    # Grids are specified to share one size; pad to the largest anyway so one odd grid cannot abort.
    width = max(im.width for im in images)
    height = max(im.height for im in images) + band

    frames = []
    for (step, _), im in zip(grids, images, strict=True):
        canvas = Image.new(mode, (width, height), 0)
        canvas.paste(im.convert(mode), (0, band))
        ImageDraw.Draw(canvas).text((3, 3), f"step {step:,}", fill=255 if gray else (255, 255, 255), font=font)
        frames.append(np.asarray(canvas))

    out_path.parent.mkdir(parents=True, exist_ok=True)
    # duration is per frame in ms for Pillow's GIF writer; loop=0 means loop forever. Frames never repeat
    # exactly (each carries its own step label), so Pillow will not merge consecutive frames.
    iio.imwrite(
        out_path,
        np.stack(frames),
        plugin="pillow",
        extension=".gif",
        is_batch=True,
        duration=1000.0 / fps,
        loop=0,
    )
    return out_path


# -------------------------------------------------------------------------------------------- latents


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1); linear when a, b are (anti)parallel."""
    if a.shape != b.shape:
        raise ValueError(f"slerp: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"slerp: t must be in [0, 1], got {t}")
    # Angle computed in float64: for float32 latents near-parallel vectors lose the angle to rounding.
    a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()
    denom = float(a64.norm() * b64.norm())
    cos = float(a64 @ b64) / denom if denom > 0 else 1.0
    omega = math.acos(min(1.0, max(-1.0, cos)))
    sin_omega = math.sin(omega)
    if sin_omega < 1e-6:
        # sin(omega) ~ 0 makes the slerp weights 0/0; the lerp is the limit for parallel vectors.
        return torch.lerp(a, b, t) if a.is_floating_point() else a + t * (b - a)
    wa = math.sin((1.0 - t) * omega) / sin_omega
    wb = math.sin(t * omega) / sin_omega
    return wa * a + wb * b


def _unwrap(G: nn.Module) -> nn.Module:
    # DDP / torch.compile wrappers hide z_dim; the wrapped module has it.
    for attr in ("module", "_orig_mod"):
        if not hasattr(G, "z_dim") and isinstance(getattr(G, attr, None), nn.Module):
            G = getattr(G, attr)
    return G


def _z_dim(G: nn.Module) -> int:
    z_dim = getattr(_unwrap(G), "z_dim", None)
    if not isinstance(z_dim, int) or z_dim <= 0:
        raise AttributeError(f"generator {type(G).__name__} has no positive int attribute z_dim")
    return z_dim


def _device_dtype(G: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in (*G.parameters(), *G.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _generate(G: nn.Module, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """G(z) (or G(z, y) for a conditional G: y class indices (N,) or class weights (N, 10)) on G's device in
    eval mode without autograd; returns CPU float32 images."""
    device, dtype = _device_dtype(G)
    # Per-module flags restored afterwards: G.train(prev) would clobber submodules deliberately kept in eval.
    modes = [(m, m.training) for m in G.modules()]
    G.eval()
    try:
        with torch.no_grad():
            if y is None:
                outs = [G(chunk.to(device=device, dtype=dtype)) for chunk in z.split(_GEN_BATCH)]
            else:
                outs = [
                    G(chunk.to(device=device, dtype=dtype), labels.to(device))
                    for chunk, labels in zip(z.split(_GEN_BATCH), y.split(_GEN_BATCH), strict=True)
                ]
    finally:
        for m, training in modes:
            m.training = training
    images = torch.cat(outs).float().cpu()
    if images.shape[0] != z.shape[0]:
        raise RuntimeError(f"generator returned {images.shape[0]} images for {z.shape[0]} latents")
    return images


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise UsageError(f"{name} must be >= 1, got {value}")


def latent_sweep(
    G: nn.Module,
    dim: int,
    lo: float,
    hi: float,
    steps: int,
    rows: int = 8,
    seed: int = 0,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Vary latent dimension ``dim`` linearly from ``lo`` to ``hi`` over ``steps`` values for ``rows`` random
    base vectors; return images (rows*steps, 1, 28, 28) row-major (row i, step j at i*steps + j), on CPU.
    A conditional G draws row i as class ``labels[i]`` (a walk within that class)."""
    z_dim = _z_dim(G)
    if not 0 <= dim < z_dim:
        raise UsageError(f"--dim must be in [0, {z_dim}) for this generator, got {dim}")
    _check_positive("--steps", steps)
    _check_positive("--rows", rows)
    # Latents are drawn on CPU so a given seed gives the same sweep on every device.
    base = torch.randn(rows, z_dim, generator=torch.Generator().manual_seed(seed))
    z = base.repeat_interleave(steps, dim=0)
    z[:, dim] = torch.linspace(lo, hi, steps).repeat(rows)
    return _generate(G, z, _row_labels(labels, rows, steps))


def _row_labels(labels: torch.Tensor | None, rows: int, steps: int) -> torch.Tensor | None:
    """Per-row class indices (rows,) -> per-image (rows * steps,), or None."""
    if labels is None:
        return None
    if labels.shape != (rows,):
        raise ValueError(f"need one label per row ({rows}), got {tuple(labels.shape)}")
    return labels.long().repeat_interleave(steps)


def latent_between(
    G: nn.Module, seed_a: int, seed_b: int, steps: int, rows: int = 1, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """Slerp from the latent of seed ``seed_a + i`` to that of ``seed_b + i`` in ``steps`` steps for each row
    i; return images (rows*steps, 1, 28, 28) row-major, on CPU. A conditional G draws row i as class
    ``labels[i]``."""
    z_dim = _z_dim(G)
    _check_positive("--steps", steps)
    _check_positive("--rows", rows)
    ts = torch.linspace(0.0, 1.0, steps).tolist()
    zs = []
    for i in range(rows):
        z_a = torch.randn(z_dim, generator=torch.Generator().manual_seed(seed_a + i))
        z_b = torch.randn(z_dim, generator=torch.Generator().manual_seed(seed_b + i))
        zs.extend(slerp(z_a, z_b, t) for t in ts)
    return _generate(G, torch.stack(zs), _row_labels(labels, rows, steps))


def class_between(G: nn.Module, class_a: int, class_b: int, steps: int, rows: int = 1, seed: int = 0) -> torch.Tensor:
    """For a conditional G: keep row i's latent (seed ``seed + i``) and move the label from class ``class_a``
    to ``class_b`` in ``steps`` steps (class weights (1 - t) e_a + t e_b, which mix the classes' embeddings);
    images (rows*steps, 1, 28, 28) row-major, on CPU."""
    from gan_ddp.components.models import N_CLASSES

    _check_positive("--steps", steps)
    _check_positive("--rows", rows)
    for name, c in (("A", class_a), ("B", class_b)):
        if not 0 <= c < N_CLASSES:
            raise UsageError(f"--classes {name} must be in [0, {N_CLASSES}), got {c}")
    z_dim = _z_dim(G)
    z = torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(seed + i)) for i in range(rows)])
    t = torch.linspace(0.0, 1.0, steps)
    weights = torch.zeros(steps, N_CLASSES)
    weights[:, class_a] += 1.0 - t
    weights[:, class_b] += t
    return _generate(G, z.repeat_interleave(steps, dim=0), weights.repeat(rows, 1))


def save_grid(images: torch.Tensor, path: str | Path, nrow: int) -> Path:
    """Save images in [-1, 1] as a PNG grid with ``nrow`` images per row (2 px padding); return the path."""
    from torchvision.utils import make_grid, save_image

    _check_positive("nrow", nrow)
    grid = make_grid(images.detach().float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path, format="png")
    return path
