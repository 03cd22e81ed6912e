"""`gan-ddp bench`: it runs and reports every figure (no timing assertions), and the loops it compares
compute the same thing where their semantics coincide (lean vs textbook; torch.compile on vs off)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _runs import ONE_MACHINE
from torch import nn

from gan_ddp.config import load_config
from gan_ddp.runtime.compat import compile_unsupported
from gan_ddp.tools import bench, textbook

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
MLP = REPO / "configs" / "mnist_mlp.yaml"


@pytest.fixture(autouse=True)
def _isolate_process_state() -> Iterator[None]:
    """Trainers built in this process set torch's thread count and Accelerate's process-wide state."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def _cli_has_bench() -> bool:
    from gan_ddp.commands import cli

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            cli.build_parser().parse_args(["bench", "--config", str(SMOKE)])
    except SystemExit:
        return False
    return True


def _bench_namespace(argv: list[str]) -> argparse.Namespace:
    from gan_ddp.commands.cli import build_parser

    return build_parser().parse_args(["bench", *argv])


def _run_bench(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """`python -m gan_ddp bench ...` in a subprocess once the CLI knows `bench`; in-process until then."""
    if _cli_has_bench():
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        result = subprocess.run(
            [sys.executable, "-m", "gan_ddp", "bench", *argv],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, (
            f"bench exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        return result.stdout
    assert bench.run_bench(_bench_namespace(argv)) == 0
    return capsys.readouterr().out


def test_bench_prints_every_figure_and_writes_json(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "out" / "bench.json"
    argv = ["--config", str(SMOKE), "--baseline", "--json", str(out_json), "--warmup", "2", "--iters", "4"]
    argv += [f"data.root={mnist_root}", "train.threads=1"]
    stdout = _run_bench(argv, capsys)

    figures = json.loads(out_json.read_text())
    assert set(bench.KEYS) <= set(figures)
    for key in bench.KEYS:
        assert key in stdout, f"{key} not printed"
    for key in ("img_per_s", "ms_per_iter", "ms_data", "ms_d_step", "ms_g_step", "peak_rss_mb", "ckpt_save_s"):
        assert isinstance(figures[key], float) and figures[key] > 0, key
    assert figures["baseline_img_per_s"] > 0 and figures["speedup"] > 0
    assert figures["precision"] == "no" and figures["precision_reason"]
    assert (figures["threads"], figures["world_size"], figures["device"]) == (1, 1, "cpu")
    # the split is of the iteration: its parts cannot add up to more than the whole
    parts = figures["ms_data"] + figures["ms_d_step"] + figures["ms_g_step"]
    assert parts <= figures["ms_per_iter"] * 1.001


def test_bench_without_baseline_leaves_its_figures_null(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json = tmp_path / "bench.json"
    argv = ["--config", str(SMOKE), "--json", str(out_json), "--warmup", "0", "--iters", "2"]
    assert bench.run_bench(_bench_namespace([*argv, f"data.root={mnist_root}", "train.threads=1"])) == 0
    figures = json.loads(out_json.read_text())
    assert figures["baseline_img_per_s"] is None and figures["speedup"] is None
    # the instrumentation is gone afterwards: the step module's normalize is the real one again
    import gan_ddp.components.data
    import gan_ddp.training.step

    assert gan_ddp.training.step.normalize is gan_ddp.components.data.normalize


def test_bench_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="--iters"):
        bench.run_bench(_bench_namespace(["--config", str(SMOKE), "--iters", "0"]))


def test_textbook_dataset_matches_the_lean_normalisation() -> None:
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    dataset = textbook.TextbookMNIST(images, torch.arange(5), textbook.textbook_transform())
    per_image = torch.stack([dataset[i][0] for i in range(5)])  # (5, 1, 28, 28)
    from gan_ddp.components.data import normalize

    torch.testing.assert_close(per_image, normalize(images.unsqueeze(1)), atol=1e-6, rtol=0)


def _trainer(mnist_root: Path, run_dir: Path, *overrides: str, config: Path = SMOKE):
    from gan_ddp.training.trainer import Trainer

    cfg = load_config(
        config,
        [f"data.root={mnist_root}", "data.split=test", f"run.dir={run_dir}", "log.wandb=disabled", *overrides],
    )
    return Trainer(cfg)


@pytest.mark.parametrize("reuse_fake", [True, False])
def test_lean_step_and_textbook_step_agree(mnist_root: Path, tmp_path: Path, reuse_fake: bool) -> None:
    """Dropout 0, fp32, same weights, same real batch, same noise: BCE-with-logits on D's logits (lean)
    equals BCELoss on sigmoid outputs (textbook), for the D step and for the G step after it."""
    trainer = _trainer(
        mnist_root, tmp_path, "model.dropout=0", "train.precision='no'", f"train.reuse_fake={reuse_fake}"
    )
    assert trainer.parts.precision == "no" and trainer.cfg.loss.real_label == 1.0
    G, D = textbook.textbook_models(trainer.cfg.model)
    G.load_state_dict(trainer.gan.G_raw.state_dict())
    D[0].load_state_dict(trainer.gan.D_raw.state_dict())
    opt_g, opt_d = textbook.textbook_optimizers(G, D, trainer.cfg.optim)

    trainer.parts.loader.set_epoch(0)
    batch = next(iter(trainer.parts.loader))
    transform = textbook.textbook_transform()
    from PIL import Image

    real = torch.stack([transform(Image.fromarray(image.squeeze(0).numpy())) for image in batch[0]])
    z_d = trainer.gan.noise(1, 0)
    z_g = z_d if reuse_fake else trainer.gan.noise(1, 1)  # reuse_fake: G is unchanged by the D step

    trainer.gan.train_step(batch, 1)
    loss_d, loss_g = textbook.textbook_step(G, D, opt_g, opt_d, nn.BCELoss(), real, z_d, z_g)

    lean_d, lean_g = trainer.gan.window.value("loss/d"), trainer.gan.window.value("loss/g")
    assert lean_d == pytest.approx(float(loss_d), abs=1e-5)
    assert lean_g == pytest.approx(float(loss_g), abs=1e-5)
    for name, value in trainer.gan.D_raw.state_dict().items():
        torch.testing.assert_close(D[0].state_dict()[name], value, atol=1e-5, rtol=0, msg=f"D.{name}")
    for name, value in trainer.gan.G_raw.state_dict().items():
        torch.testing.assert_close(G.state_dict()[name], value, atol=1e-5, rtol=0, msg=f"G.{name}")


def _one_step(mnist_root: Path, run_dir: Path, compile_: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    trainer = _trainer(
        mnist_root,
        run_dir,
        f"train.compile={compile_}",
        "train.precision='no'",
        "model.dropout=0",
        "train.batch_size=32",
        "model.g_hidden=[64,128]",
        "model.d_hidden=[128,64]",
        config=MLP,
    )
    trainer.parts.loader.set_epoch(0)
    trainer.gan.train_step(next(iter(trainer.parts.loader)), 1)
    weights = {f"G.{k}": v.detach().clone() for k, v in trainer.gan.G_raw.state_dict().items()}
    weights |= {f"D.{k}": v.detach().clone() for k, v in trainer.gan.D_raw.state_dict().items()}
    return trainer.gan.window.sums.tolist(), weights


@pytest.mark.slow
@pytest.mark.skipif(bool(compile_unsupported()), reason=f"torch.compile unavailable: {compile_unsupported()}")
def test_compile_on_and_off_agree(mnist_root: Path, tmp_path: Path) -> None:
    """One real train_step of the MLP from identical weights, with and without torch.compile."""
    eager_stats, eager = _one_step(mnist_root, tmp_path / "eager", compile_=False)
    torch._dynamo.reset()
    compiled_stats, compiled = _one_step(mnist_root, tmp_path / "compiled", compile_=True)
    torch._dynamo.reset()
    assert compiled_stats == pytest.approx(eager_stats, abs=1e-4)
    assert {k.replace("_orig_mod.", "") for k in compiled} == set(eager)
    for name, value in compiled.items():
        torch.testing.assert_close(value, eager[name.replace("_orig_mod.", "")], atol=1e-4, rtol=0, msg=name)


@pytest.mark.multiprocess
def test_bench_under_torchrun_reports_once_for_both_processes(mnist_root: Path, tmp_path: Path) -> None:
    """Two processes (gloo): one table, printed by the main process, with global figures."""
    out_json = tmp_path / "bench.json"
    bench_args = ["--config", str(SMOKE), "--baseline", "--json", str(out_json), "--warmup", "2", "--iters", "4"]
    bench_args += [f"data.root={mnist_root}", "train.threads=1"]
    if _cli_has_bench():
        target = ["-m", "gan_ddp", "bench"]
    else:  # until the CLI knows `bench`: a two-line script that calls it
        script = tmp_path / "bench_entry.py"
        script.write_text(
            "import sys\nfrom tests.test_bench import _bench_namespace\nfrom gan_ddp.tools.bench import run_bench\n"
            "sys.exit(run_bench(_bench_namespace(sys.argv[1:])))\n"
        )
        target = [str(script)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", *ONE_MACHINE, "--nproc_per_node", "2", *target]
    result = subprocess.run([*cmd, *bench_args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.stdout.count("gan-ddp bench:") == 1  # the table's title: main process only
    figures = json.loads(out_json.read_text())
    assert figures["world_size"] == 2 and figures["threads"] == 1
    assert figures["img_per_s"] > 0 and figures["baseline_img_per_s"] > 0 and figures["peak_rss_mb"] > 0


def test_textbook_command_writes_scorable_samples_on_a_time_budget(tmp_path: Path, capsys) -> None:
    """`gan-ddp textbook`: the tutorials' loop trained for --seconds, sample files every --every seconds of
    training in the `sample` format, and a log line per file."""
    import numpy as np

    from gan_ddp.commands import cli

    out = tmp_path / "tb"
    argv = ["textbook", "--config", str(SMOKE), "--seconds", "1.2", "--every", "0.4", "--n", "30", "--out", str(out)]
    assert cli.main(argv) == 0
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(lines) >= 2 and lines[-1]["time_s"] >= 1.2
    assert [line["time_s"] for line in lines] == sorted(line["time_s"] for line in lines)
    for line in lines:
        with np.load(out / line["samples"]) as npz:
            assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (30, 28, 28, 1)
        assert np.isfinite(line["loss/d"]) and line["step"] > 0
    assert cli.main(["textbook", "--config", str(SMOKE), "--seconds", "0", "--out", str(out)]) == 2
    assert "--seconds must be > 0" in capsys.readouterr().err
