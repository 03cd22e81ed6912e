"""Tests for gan_ddp.components.viz: metric plots, progress GIF, latent walks, grid saving (CPU only, no training)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.utils import save_image

from gan_ddp.components import viz

# ----------------------------------------------------------------------------------------------- helpers


def _write_metrics(run: Path, with_eval: bool = True, truncated: bool = True) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, step in enumerate(range(50, 1050, 50)):
        lines.append(
            json.dumps(
                {
                    "step": step,
                    "epoch": step // 500,
                    "world_size": 2,
                    "img_per_s": 1234.5,
                    "loss/d": 1.4 - 0.02 * i,
                    "loss/g": 0.7 + 0.01 * i,
                    "score/real": 0.5 + 0.01 * i,
                    "score/fake": 0.5 - 0.01 * i,
                    "lr/g": 2e-4,
                    "lr/d": 2e-4,
                }
            )
        )
        if with_eval and step % 500 == 0:
            lines.append(json.dumps({"step": step, "eval/fid": 100.0 / (1 + i)}))
    text = "\n".join(lines) + "\n"
    if truncated:
        text += '{"step": 1050, "loss/d": 1.'  # crash mid-write
    path = run / "metrics.jsonl"
    path.write_text(text)
    return path


class LinearG(nn.Module):
    """Tiny fake generator: fixed linear map + tanh; records its inputs and its mode during forward."""

    def __init__(self, z_dim: int = 4) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.fc = nn.Linear(z_dim, 28 * 28)
        torch.manual_seed(0)
        nn.init.normal_(self.fc.weight)
        self.inputs: list[torch.Tensor] = []
        self.seen_training: list[bool] = []
        self.seen_grad: list[bool] = []

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.inputs.append(z.detach().clone())
        self.seen_training.append(self.training)
        self.seen_grad.append(torch.is_grad_enabled())
        return torch.tanh(self.fc(z)).view(-1, 1, 28, 28)

    @property
    def z(self) -> torch.Tensor:
        return torch.cat(self.inputs)


# ----------------------------------------------------------------------------------------------- metrics


def test_read_metrics_skips_truncated_last_line(tmp_path: Path) -> None:
    path = _write_metrics(tmp_path)
    rows = viz.read_metrics(path)
    assert len(rows) == 20 + 2
    assert rows[-1]["step"] == 1000
    assert all(isinstance(r, dict) for r in rows)
    # a run directory is accepted too
    assert viz.read_metrics(tmp_path) == rows


def test_read_metrics_warns_on_malformed_middle_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss/d": 1.0}\n{"step": 2, "lo{"step": 2, "loss/d": 0.9}\n\n{"step": 3}\n')
    with pytest.warns(UserWarning, match=":2:"):
        rows = viz.read_metrics(path)
    assert [r["step"] for r in rows] == [1, 3]


def test_read_metrics_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        viz.read_metrics(tmp_path / "metrics.jsonl")


def _assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.mode in ("RGB", "RGBA")
        # 7x4 in at 100 dpi
        assert im.size == (700, 400)


def test_plot_metrics_writes_pngs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_metrics(run)
    paths = viz.plot_metrics(run)
    assert [p.name for p in paths] == ["losses.png", "scores.png", "fid.png"]
    for p in paths:
        assert p.parent == run / "plots"
        _assert_png(p)


def test_plot_metrics_without_eval_has_no_fid(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_metrics(run, with_eval=False, truncated=False)
    paths = viz.plot_metrics(run)
    assert [p.name for p in paths] == ["losses.png", "scores.png"]
    assert not (run / "plots" / "fid.png").exists()


def test_plot_metrics_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        viz.plot_metrics(tmp_path)


def test_plot_metrics_no_loss_lines(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1000, "eval/fid": 12.3}\n')
    with pytest.raises(FileNotFoundError, match=r"metrics\.jsonl"):
        viz.plot_metrics(tmp_path)


def test_import_does_not_load_matplotlib() -> None:
    code = "import sys, gan_ddp.components.viz; assert 'matplotlib' not in sys.modules and 'imageio' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --------------------------------------------------------------------------------------------- animation


def _write_grids(run: Path, steps_and_levels: list[tuple[int, float]]) -> None:
    samples = run / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    for step, level in steps_and_levels:
        imgs = torch.full((64, 1, 28, 28), level)
        save_image(imgs, samples / f"step_{step:08d}.png", nrow=8)


def test_make_animation_one_frame_per_grid_in_step_order(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # written out of order; step 1500 > 200 numerically, brightness increases with step
    _write_grids(run, [(1500, 0.9), (200, 0.5), (0, 0.1)])
    gif = viz.make_animation(run)
    assert gif == run / "samples" / "progress.gif"
    with Image.open(gif) as im:
        assert im.format == "GIF"
        assert im.n_frames == 3
        assert im.info.get("loop") == 0
        grid_w, grid_h = 8 * 28 + 9 * 2, 8 * 28 + 9 * 2
        assert im.width == grid_w
        assert im.height > grid_h  # header band above the grid

    frames = list(iio.imiter(gif, plugin="pillow"))
    assert len(frames) == 3
    means = [np.asarray(f, dtype=np.float64)[-grid_h:].mean() for f in frames]
    assert means[0] < means[1] < means[2]
    # the header band carries text: some bright pixels on a dark band, not identical across frames
    bands = [np.asarray(f)[: f.shape[0] - grid_h] for f in frames]
    assert all(b.max() > 128 for b in bands)
    assert not np.array_equal(bands[0], bands[2])


def test_make_animation_custom_out_and_fps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_grids(run, [(10, 0.2), (20, 0.8)])
    out = viz.make_animation(run, out=tmp_path / "anim" / "x.gif", fps=2)
    assert out == tmp_path / "anim" / "x.gif"
    with Image.open(out) as im:
        assert im.n_frames == 2
        assert im.info["duration"] == 500


def test_make_animation_no_grids(tmp_path: Path) -> None:
    (tmp_path / "samples").mkdir()
    with pytest.raises(FileNotFoundError, match="step_"):
        viz.make_animation(tmp_path)


# ----------------------------------------------------------------------------------------------- latents


def test_slerp_endpoints_and_norms() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, generator=g)
    b = torch.randn(16, generator=g)
    a, b = a / a.norm(), b / b.norm()
    assert torch.allclose(viz.slerp(a, b, 0.0), a)
    assert torch.allclose(viz.slerp(a, b, 1.0), b)
    for t in (0.1, 0.25, 0.5, 0.9):
        v = viz.slerp(a, b, t)
        assert v.shape == a.shape
        assert 1 - 1e-5 <= float(v.norm()) <= 1 + 1e-5
    # midpoint is equiangular
    mid = viz.slerp(a, b, 0.5)
    assert torch.allclose(mid @ a, mid @ b, atol=1e-6)


def test_slerp_parallel_falls_back_to_lerp() -> None:
    a = torch.tensor([1.0, 2.0, 3.0])
    b = 2 * a
    assert torch.allclose(viz.slerp(a, b, 0.5), 1.5 * a)
    assert torch.isfinite(viz.slerp(a, a, 0.3)).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        viz.slerp(a, b, 1.5)


def test_latent_sweep_varies_only_dim() -> None:
    G = LinearG(z_dim=4)
    G.train()
    rows, steps, dim = 3, 5, 2
    imgs = viz.latent_sweep(G, dim=dim, lo=-2.0, hi=2.0, steps=steps, rows=rows, seed=7)
    assert imgs.shape == (rows * steps, 1, 28, 28)
    assert imgs.min() >= -1
    assert imgs.max() <= 1
    assert G.training, "previous mode restored"
    assert G.seen_training == [False]
    assert G.seen_grad == [False]
    z = G.z.view(rows, steps, 4)
    expected = torch.linspace(-2.0, 2.0, steps)
    for r in range(rows):
        assert torch.allclose(z[r, :, dim], expected)
        others = [d for d in range(4) if d != dim]
        assert torch.equal(z[r, :, others], z[r, :1, others].expand(steps, -1))
    # distinct base vectors per row, deterministic in seed
    assert not torch.equal(z[0, 0, 0], z[1, 0, 0])
    G2 = LinearG(z_dim=4)
    viz.latent_sweep(G2, dim=dim, lo=-2.0, hi=2.0, steps=steps, rows=rows, seed=7)
    assert torch.equal(G2.z, G.z)


def test_latent_sweep_restores_eval_mode() -> None:
    G = LinearG().eval()
    viz.latent_sweep(G, dim=0, lo=-1, hi=1, steps=2, rows=1)
    assert not G.training


@pytest.mark.parametrize("dim", [-1, 4])
def test_latent_sweep_rejects_bad_dim(dim: int) -> None:
    with pytest.raises(ValueError, match="--dim"):
        viz.latent_sweep(LinearG(z_dim=4), dim=dim, lo=-1, hi=1, steps=3)


def test_latent_between_endpoints_follow_seeds() -> None:
    G = LinearG(z_dim=4)
    rows, steps = 2, 6
    imgs = viz.latent_between(G, seed_a=3, seed_b=11, steps=steps, rows=rows)
    assert imgs.shape == (rows * steps, 1, 28, 28)
    z = G.z.view(rows, steps, 4)
    for i in range(rows):
        z_a = torch.randn(4, generator=torch.Generator().manual_seed(3 + i))
        z_b = torch.randn(4, generator=torch.Generator().manual_seed(11 + i))
        assert torch.allclose(z[i, 0], z_a)
        assert torch.allclose(z[i, -1], z_b, atol=1e-6)


def test_save_grid_size(tmp_path: Path) -> None:
    rows, steps = 3, 5
    imgs = torch.rand(rows * steps, 1, 28, 28) * 2 - 1
    path = viz.save_grid(imgs, tmp_path / "sub" / "grid.png", nrow=steps)
    assert path == tmp_path / "sub" / "grid.png"
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (28 * steps + 2 * (steps + 1), 28 * rows + 2 * (rows + 1))
    ones = viz.save_grid(torch.ones(2, 1, 28, 28), tmp_path / "ones.png", nrow=2)
    arr = np.asarray(Image.open(ones))
    assert arr[2:30, 2:30].min() == 255
