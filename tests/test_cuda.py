"""The GPU tier (`pytest -m cuda`; launch/gpu_selfcheck.sh runs it and writes a report). Skipped where no
CUDA GPU is visible, so on CPU machines these count as skipped, with the reason.

What it proves on a real GPU: training runs for a few hundred steps in every precision the GPU supports;
the dataset is resident on the GPU; the steps between two log steps never synchronise with the host
(`torch.cuda.set_sync_debug_mode("error")` turns any sync into an error); the fp16 skip counters match what
the gradient scaler did, and a skipped step leaves the weights untouched; resume is bitwise exact; the
launch-overhead lever (`train.compile_mode=reduce-overhead`, CUDA graphs) agrees with eager and resumes.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _runs import (
    MNIST,
    SMOKE,
    assert_same_tensors,
    base_env,
    checkpoint_tensors,
    losses_by_step,
    metric_lines,
    newest_checkpoint,
    single,
    torchrun,
    train_cmd,
    train_inproc,
)
from omegaconf import OmegaConf

HAS_CUDA = torch.cuda.is_available()
CAPABILITY = torch.cuda.get_device_capability() if HAS_CUDA else (0, 0)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: run `pytest -m cuda` or launch/gpu_selfcheck.sh on one"),
    pytest.mark.skipif(not MNIST.is_dir(), reason="needs the MNIST test split (tests/_runs.py MNIST)"),
]

# fp32 and fp16 autocast run on every CUDA GPU (fp16 is only slow below 6.0); bf16 needs compute capability 8.0.
PRECISIONS = [
    "no",
    "fp16",
    pytest.param(
        "bf16",
        marks=pytest.mark.skipif(
            HAS_CUDA and CAPABILITY < (8, 0), reason=f"bf16 needs compute capability 8.0, not {CAPABILITY}"
        ),
    ),
]
STEPS = 300  # smoke config: batch 64, 156 steps per epoch of the 10k test split
LONG = ("train.epochs=2", f"train.steps={STEPS}", "log.every=50", "log.sample_every=300", "checkpoint.every=300")
# A fixed cuBLAS workspace split makes cuBLAS results repeatable run to run (NVIDIA's cuBLAS docs,
# "Results reproducibility"); the MLP's other kernels (elementwise, fused Adam, cat, slicing) use no atomics.
DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
GRADSCALER_INIT = 2.0**16  # Accelerate builds GradScaler with torch's defaults: init_scale 2**16, growth_interval 2000


def make_trainer(run_dir: Path, *overrides: str):
    from accelerate.state import AcceleratorState, GradientState

    from gan_ddp.config import load_config
    from gan_ddp.training.trainer import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    cfg = load_config(
        SMOKE, [f"data.root={MNIST}", "data.split=test", f"run.dir={run_dir}", "log.wandb=disabled", *overrides]
    )
    return Trainer(cfg)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_few_hundred_steps_on_one_gpu(tmp_path, precision):
    assert train_inproc(tmp_path, *LONG, f"train.precision={precision}") == 0
    lines = [m for m in metric_lines(tmp_path) if "loss/d" in m]
    assert [m["step"] for m in lines] == list(range(50, STEPS + 1, 50))
    for m in lines:
        assert all(math.isfinite(m[k]) for k in ("loss/d", "loss/g", "score/real", "score/fake")), m
    # Parsed, not matched as text: YAML writes the precision "no" quoted ('no'), as a bare no is a boolean.
    resolved = OmegaConf.load(tmp_path / "config.yaml").resolved
    assert resolved.device == "cuda" and resolved.precision == precision, resolved
    if precision == "fp16":
        # One scaler, two optimizers: 2 * STEPS updates, fewer than growth_interval, so the scale only ever
        # halves, once per skipped step: the counters must account for it exactly.
        last = lines[-1]
        skipped = last["amp/skipped_d"] + last["amp/skipped_g"]
        assert last["amp/scale"] == GRADSCALER_INIT / 2**skipped, last
        assert skipped < STEPS // 10  # an MLP GAN at this scale overflows a handful of times, at the start


def test_dataset_is_resident_on_the_gpu(tmp_path):
    trainer = make_trainer(tmp_path)
    assert trainer.parts.device.type == "cuda"
    dataset = trainer.parts.loader.dataset
    assert dataset.images.device.type == "cuda" and dataset.images.dtype == torch.uint8
    images, _ = next(iter(trainer.parts.loader))
    assert images.device.type == "cuda"
    trainer.accelerator.end_training()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_no_host_sync_between_log_steps(tmp_path, precision):
    """Every step between two log steps runs with any CUDA-host synchronisation turned into an error."""
    trainer = make_trainer(tmp_path, f"train.precision={precision}", "optim.d_steps=2")
    batches = [b for _, b in zip(range(12), trainer.parts.loader, strict=False)]  # fetched first: the loop's loader
    for step, batch in enumerate(batches[:2], start=1):  # warm-up: lazy scaler state, cuBLAS handles
        trainer.gan.train_step(batch, step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, batch in enumerate(batches[2:], start=3):
            trainer.gan.train_step(batch, step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    window = trainer.gan.window.sums.tolist()  # the log step: one sync, allowed
    assert trainer.gan.window.value("steps") == pytest.approx(12.0) and all(math.isfinite(x) for x in window)
    trainer.accelerator.end_training()


def test_fp16_overflow_is_skipped_counted_and_leaves_weights_alone(tmp_path):
    trainer = make_trainer(tmp_path, "train.precision=fp16")
    batches = [b for _, b in zip(range(3), trainer.parts.loader, strict=False)]
    trainer.gan.train_step(batches[0], 1)
    trainer.gan.train_step(batches[1], 2)
    scaler = trainer.accelerator.scaler
    assert scaler is not None
    before = trainer.gan.skipped.tolist()
    weights = {f"G.{k}": v.detach().clone() for k, v in trainer.gan.G_raw.state_dict().items()}
    weights |= {f"D.{k}": v.detach().clone() for k, v in trainer.gan.D_raw.state_dict().items()}
    scaler._scale.fill_(2.0**60)  # loss * 2**60 overflows fp16 in both backward passes
    trainer.gan.train_step(batches[2], 3)
    after = trainer.gan.skipped.tolist()
    assert after == [before[0] + 1, before[1] + 1], (before, after)
    for name, value in trainer.gan.G_raw.state_dict().items():
        assert torch.equal(value, weights[f"G.{name}"]), f"G.{name} changed in a skipped step"
    for name, value in trainer.gan.D_raw.state_dict().items():
        if "running" in name or "num_batches" in name:  # BatchNorm statistics move in the forward
            continue
        assert torch.equal(value, weights[f"D.{name}"]), f"D.{name} changed in a skipped step"
    assert float(scaler.get_scale()) == 2.0**58  # backed off once per optimizer
    trainer.accelerator.end_training()


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_resume_on_gpu_is_bitwise_exact(tmp_path, precision):
    """2N steps straight == N steps, stop, N more (weights, EMA, both optimizers, metrics), on the GPU."""
    env = base_env(**DETERMINISTIC)
    common = (f"train.precision={precision}", "train.epochs=2", "checkpoint.every=40", "log.every=10")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert single(train_cmd(straight, *common, "train.steps=80"), env).returncode == 0
    first = single(train_cmd(resumed, *common, "train.steps=40"), env)
    assert first.returncode == 0, first.stderr[-2000:]
    second = single(train_cmd(resumed, *common, "train.steps=80"), env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout
    assert_same_tensors(checkpoint_tensors(newest_checkpoint(straight)), checkpoint_tensors(newest_checkpoint(resumed)))
    assert losses_by_step(straight) == losses_by_step(resumed)


def test_reduce_overhead_agrees_with_eager_for_one_step(tmp_path):
    """The launch-overhead lever (CUDA graphs through torch.compile) computes the same step as eager."""
    from gan_ddp.runtime.compat import compile_unsupported

    if compile_unsupported():
        pytest.skip(f"torch.compile unavailable here: {compile_unsupported()}")

    def one_step(run_dir, *overrides):
        trainer = make_trainer(run_dir, "model.dropout=0", *overrides)
        batch = next(iter(trainer.parts.loader))
        trainer.gan.train_step(batch, 1)
        out = {f"G.{k}": v.detach().clone() for k, v in trainer.gan.G_raw.state_dict().items()}
        out |= {f"D.{k}": v.detach().clone() for k, v in trainer.gan.D_raw.state_dict().items()}
        stats = trainer.gan.window.sums.tolist()
        trainer.accelerator.end_training()
        return stats, {k.replace("_orig_mod.", ""): v for k, v in out.items()}

    eager_stats, eager = one_step(tmp_path / "eager")
    torch._dynamo.reset()
    graph_stats, graphed = one_step(tmp_path / "graphs", "train.compile=true", "train.compile_mode=reduce-overhead")
    torch._dynamo.reset()
    # Inductor fuses and reorders float arithmetic: equal to rounding, not bitwise.
    assert graph_stats == pytest.approx(eager_stats, abs=1e-4)
    assert graphed.keys() == eager.keys()
    for name, value in graphed.items():
        torch.testing.assert_close(value, eager[name], atol=1e-4, rtol=0, msg=name)


@pytest.mark.parametrize("precision", ["no", "fp16"])
def test_reduce_overhead_trains_and_resumes(tmp_path, precision):
    """CUDA graphs under the fp16 scaler and across a resume. Tolerance, not bitwise: the compiled kernels
    may be autotuned differently in the second process (another reduction order), and GAN training
    amplifies rounding differences step by step; 1e-3 on weights after 40 steps of Adam at 2e-4 still
    catches a lost optimizer state or a wrong data position, which move weights by far more."""
    from gan_ddp.runtime.compat import compile_unsupported

    if compile_unsupported():
        pytest.skip(f"torch.compile unavailable here: {compile_unsupported()}")
    lever = ("train.compile=true", "train.compile_mode=reduce-overhead", f"train.precision={precision}")
    common = (*lever, "train.epochs=2", "checkpoint.every=40", "log.every=10")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert single(train_cmd(straight, *common, "train.steps=80"), timeout=900).returncode == 0
    assert single(train_cmd(resumed, *common, "train.steps=40"), timeout=900).returncode == 0
    second = single(train_cmd(resumed, *common, "train.steps=80"), timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    a = checkpoint_tensors(newest_checkpoint(straight))
    b = checkpoint_tensors(newest_checkpoint(resumed))
    assert_same_tensors(a, b, atol=1e-3)
    lines = [m for m in metric_lines(resumed) if "loss/d" in m]
    assert lines[-1]["step"] == 80 and all(math.isfinite(m["loss/d"]) for m in lines)


@pytest.mark.multiprocess
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL allows one rank per GPU)")
@pytest.mark.parametrize(
    "lever", [(), ("train.compile=true", "train.compile_mode=reduce-overhead")], ids=["eager", "graphs"]
)
def test_two_gpus_ddp_identical_weights(tmp_path, lever):
    env = base_env()
    result = torchrun(2, train_cmd(tmp_path, *lever, "train.steps=40", "train.check_consistency=true"), env, 900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "G and D identical on 2 ranks" in result.stdout
    facts = OmegaConf.load(tmp_path / "config.yaml").resolved
    assert facts.world_size == 2 and facts.device == "cuda", facts
