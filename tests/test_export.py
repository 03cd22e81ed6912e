"""`gan-ddp export`: a run's generator as a Hub folder that `from_pretrained` loads in a fresh process (no run
files, no config of ours), drawing exactly what the run's checkpoint draws; a model card; bad folders refused."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _runs import base_env, cli_inproc, train_cmd

from gan_ddp.components.models import DCGANGenerator, MLPGenerator, generate
from gan_ddp.components.rundir import load_generator_from_run
from gan_ddp.tools.export import ExportError, load_exported

RUNS = {  # name: (overrides, generator class); smoke-sized, 12 steps each
    "mlp": ((), MLPGenerator),
    "dcgan": (("model.arch=dcgan", "model.g_channels=8", "model.d_channels=8"), DCGANGenerator),
    "conditional": (
        ("model.arch=dcgan", "model.conditional=true", "model.g_channels=8", "model.d_channels=8"),
        DCGANGenerator,
    ),
}
SEED, N = 123, 20


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (overrides, _) in RUNS.items():
        run = root / name
        result = cli_inproc(*train_cmd(run, "train.steps=12", "checkpoint.every=6", *overrides))
        assert result.returncode == 0, result.stderr[-3000:]
        out[name] = run
    return out


def _export(run: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli_inproc("export", "--run", run, "--out", out, *extra)  # loading is what needs a fresh process


def _fresh_process_samples(folder: Path, cls: str, conditional: bool, tmp_path: Path) -> torch.Tensor:
    """Samples drawn by another Python process that only has the exported folder and the generator class."""
    out = tmp_path / f"{folder.name}-samples.pt"
    labels = f"torch.arange({N}) % 10" if conditional else "None"
    script = textwrap.dedent(f"""
        import torch
        from gan_ddp.components.models import {cls}, generate
        G = {cls}.from_pretrained({str(folder)!r})
        assert not G.training
        torch.save(generate(G, {N}, G.z_dim, {SEED}, labels={labels}), {str(out)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], env=base_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("name", list(RUNS))
def test_export_loads_in_a_fresh_process_and_draws_what_the_run_draws(name, runs, tmp_path) -> None:
    folder = tmp_path / f"export-{name}"
    result = _export(runs[name], folder)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors", "samples.png"]

    config = json.loads((folder / "config.json").read_text())
    cls = RUNS[name][1]
    assert config["arch"] == cls.arch and config["conditional"] is (name == "conditional")
    assert config["z_dim"] == 100 and config["gan_ddp"]["weights"] == "ema" and config["gan_ddp"]["step"] == 12
    assert config["gan_ddp"]["data"]["split"] == "test" and len(config["gan_ddp"]["data"]["sha256"]) == 64

    G_run, cfg, _ = load_generator_from_run(runs[name], use_ema=True)
    labels = torch.arange(N) % 10 if cfg.model.conditional else None
    expected = generate(G_run, N, cfg.model.z_dim, SEED, labels=labels)
    got = _fresh_process_samples(folder, cls.__name__, cfg.model.conditional, tmp_path)
    assert got.shape == (N, 1, 28, 28)
    assert torch.equal(got, expected)


def test_no_ema_exports_the_raw_generator(runs, tmp_path) -> None:
    folder = tmp_path / "raw"
    assert _export(runs["mlp"], folder, "--no-ema").returncode == 0
    assert json.loads((folder / "config.json").read_text())["gan_ddp"]["weights"] == "raw"
    G, _ = load_exported(folder)
    raw, _, _ = load_generator_from_run(runs["mlp"], use_ema=False)
    ema, _, _ = load_generator_from_run(runs["mlp"], use_ema=True)
    got = generate(G, N, 100, SEED)
    assert torch.equal(got, generate(raw, N, 100, SEED))
    assert not torch.equal(got, generate(ema, N, 100, SEED))


def test_an_older_checkpoint_and_the_run_metrics_reach_the_card(runs, tmp_path) -> None:
    from huggingface_hub import ModelCard

    run = runs["conditional"]
    metrics = run / "metrics.jsonl"
    saved = metrics.read_text()
    eval_line = {"step": 6, "eval/fid": 41.5, "eval/kid": 20.25, "eval/precision": 0.5, "eval/recall": 0.25}
    later = {**eval_line, "step": 12, "eval/fid": 30.0}  # after the checkpoint exported: not its metrics
    metrics.write_text(saved + json.dumps(eval_line) + "\n" + json.dumps(later) + "\n")
    try:
        folder = tmp_path / "step6"
        result = _export(run, folder, "--checkpoint", str(run / "checkpoints" / "step_00000006"))
        assert result.returncode == 0, result.stderr
    finally:
        metrics.write_text(saved)
    config = json.loads((folder / "config.json").read_text())["gan_ddp"]
    assert config["step"] == 6 and config["metrics"]["eval/fid"] == 41.5

    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "gan-ddp" and card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.datasets == ["ylecun/mnist"]
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == {
        "fid": 41.5,
        "kid": 20.25,
        "precision": 0.5,
        "recall": 0.25,
    }
    assert "DCGANGenerator.from_pretrained" in card.text and "(samples.png)" in card.text
    assert "torch.full((16,), 7)" in card.text  # the conditional call

    from PIL import Image

    assert Image.open(folder / "samples.png").size == (8 * 30 + 2, 10 * 30 + 2)  # one row per class, 8 columns


def _one_error_line(result: subprocess.CompletedProcess, *needles: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_bad_folders_are_refused_with_one_line(runs, tmp_path) -> None:
    _one_error_line(_export(tmp_path, tmp_path / "a"), "config.yaml", "run directory")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    _one_error_line(_export(runs["mlp"], full), str(full), "not empty")
    assert (full / "keep.txt").read_text() == "mine"
    _one_error_line(_export(runs["mlp"], full / "keep.txt"), "file")
    _one_error_line(_export(runs["mlp"], tmp_path / "b", "--checkpoint", str(tmp_path / "nope")), "nope")


def test_loading_checks_the_folder_and_the_class(runs, tmp_path) -> None:
    with pytest.raises(ExportError, match=r"no config\.json"):
        load_exported(tmp_path)
    folder = tmp_path / "dcgan"
    assert _export(runs["dcgan"], folder).returncode == 0
    with pytest.raises(ValueError, match=r"load it with DCGANGenerator\.from_pretrained"):
        MLPGenerator.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ExportError, match="cannot load the generator"):
        load_exported(folder)
