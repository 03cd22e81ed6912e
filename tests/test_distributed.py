"""Process and device decisions, tested without GPUs: precision by compute capability (mocked), the
launch guard, and fp16's skipped-step accounting with a mocked gradient scaler."""

from __future__ import annotations

import pytest
import torch
from _runs import MNIST, SMOKE

from gan_ddp.config import ConfigError, load_config
from gan_ddp.runtime.distributed import DistributedSetupError, check_distributed, choose_precision


@pytest.mark.parametrize(
    ("capability", "expected"),
    [((3, 7), "no"), ((5, 2), "no"), ((6, 0), "fp16"), ((6, 1), "no"), ((7, 0), "fp16"), ((7, 5), "fp16"),
     ((8, 0), "bf16"), ((8, 6), "bf16"), ((8, 9), "bf16"), ((9, 0), "bf16"), ((10, 0), "bf16")],
    ids=["K80", "M60", "P100", "P40-GTX1080", "V100", "T4", "A100", "A10G", "L4", "H100", "B200"],
)  # fmt: skip
def test_auto_precision_by_compute_capability(capability, expected):
    """bf16 from 8.0; fp16 + scaler where fp16 is fast (tensor cores from 7.0, P100's 6.0); fp32 below."""
    precision, reason = choose_precision("auto", "cuda", capability=capability)
    assert precision == expected
    assert f"{capability[0]}.{capability[1]}" in reason
    assert ("gradient scaler" in reason) == (expected == "fp16")
    assert reason.endswith("fp32") == (expected == "no")


def test_auto_precision_on_cpu_follows_native_bf16():
    # bf16 autocast measured 1.37-1.51x faster per step than fp32 on the project's AVX512-BF16 CPUs (docs/speed.md).
    precision, reason = choose_precision("auto", "cpu", cpu_has_bf16=True)
    assert precision == "bf16" and "native bf16" in reason
    assert choose_precision("auto", "cpu", cpu_has_bf16=False)[0] == "no"


def test_explicit_precision_is_kept_and_explained():
    assert choose_precision("no", "cuda", capability=(9, 0)) == ("no", "requested")
    precision, reason = choose_precision("bf16", "cuda", capability=(7, 0))
    assert precision == "bf16" and "no native bf16" in reason
    with pytest.raises(ConfigError, match=r"train\.precision: fp16 needs a GPU"):
        choose_precision("fp16", "cpu")


def test_guard_fires_only_when_the_launcher_and_accelerate_disagree():
    check_distributed(1, {})
    check_distributed(1, {"WORLD_SIZE": "1"})
    check_distributed(4, {"WORLD_SIZE": "4"})
    with pytest.raises(DistributedSetupError) as err:
        check_distributed(1, {"WORLD_SIZE": "2"})
    message = str(err.value)
    assert "\n" not in message and "ACCELERATE_USE_CPU=true" in message and "torchrun" in message


def test_skipped_fp16_steps_are_counted_and_logged(tmp_path, monkeypatch):
    """fp16 runs only on GPUs; here the optimizers report every step as skipped by the gradient scaler
    (what an overflow does), and the trainer must count both and put them in the metrics."""
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState, GradientState

    from gan_ddp.training.trainer import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    monkeypatch.setattr(AcceleratedOptimizer, "step_was_skipped", property(lambda self: True))
    cfg = load_config(SMOKE, [f"data.root={MNIST}", f"run.dir={tmp_path}", "optim.d_steps=2"])
    trainer = Trainer(cfg)
    trainer.parts.precision = "fp16"  # what a V100 would run; the counting is the same code
    for step, batch in zip(range(1, 5), trainer.parts.loader, strict=False):
        trainer.gan.train_step(batch, step)
    assert trainer.gan.skipped.tolist() == [4, 2]  # D every step, G every second step (d_steps=2)
    metrics = trainer.outputs.metrics_line(epoch=0, window_seconds=1.0)
    assert (metrics["amp/skipped_d"], metrics["amp/skipped_g"]) == (4, 2)
    assert "amp/scale" in metrics


def test_fp16_skips_inside_a_fused_optimizer_are_counted(tmp_path):
    """A fused Adam under a GradScaler is always called (it skips inside its kernel), so Accelerate's
    step_was_skipped stays False; the trainer also counts a step whose update lowered the scale. Here a
    stand-in scaler backs off at every second D step and never at G steps."""
    from accelerate.state import AcceleratorState, GradientState

    from gan_ddp.training.trainer import Trainer

    class BackingOffScaler:  # what GradScaler does to its scale tensor, without CUDA
        def __init__(self, opt_d):
            self._scale = torch.full((1,), 65536.0)
            self.opt_d, self.d_steps = opt_d, 0

        def scale(self, loss):
            return loss

        def get_scale(self):
            return float(self._scale)

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    cfg = load_config(SMOKE, [f"data.root={MNIST}", f"run.dir={tmp_path}"])
    trainer = Trainer(cfg)
    trainer.parts.precision = "fp16"
    scaler = BackingOffScaler(trainer.gan.opt_d)
    trainer.accelerator.scaler = scaler
    d_step = trainer.gan.opt_d.step

    def d_step_that_overflows_every_second_time(*args, **kwargs):
        d_step(*args, **kwargs)
        scaler.d_steps += 1
        if scaler.d_steps % 2 == 0:
            scaler._scale *= 0.5  # GradScaler.update after found-inf

    trainer.gan.opt_d.step = d_step_that_overflows_every_second_time
    for step, batch in zip(range(1, 7), trainer.parts.loader, strict=False):
        trainer.gan.train_step(batch, step)
    assert trainer.gan.skipped.tolist() == [3, 0]
    metrics = trainer.outputs.metrics_line(epoch=0, window_seconds=1.0)
    assert (metrics["amp/skipped_d"], metrics["amp/skipped_g"], metrics["amp/scale"]) == (3, 0, 65536.0 / 8)


def test_ddp_options_no_buffer_sync_in_forward_and_no_deprecation_warning(tmp_path):
    """The DDP wrapper Accelerate builds from our options: no FutureWarning on torch >= 2.13, buffers not
    re-broadcast before each forward (BatchNorm in D, see `ddp_kwargs`), gradients as bucket views."""
    import warnings

    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from gan_ddp.runtime.distributed import ddp_kwargs

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ddp = DistributedDataParallel(model, **ddp_kwargs().to_kwargs())
        assert not ddp.will_sync_module_buffers()
        assert ddp.gradient_as_bucket_view
    finally:
        dist.destroy_process_group()


def test_ddp_options_follow_the_torch_signature():
    from gan_ddp.runtime.distributed import ddp_kwargs

    class NewDDP:  # torch >= 2.13
        def __init__(self, module, broadcast_buffers=None, gradient_as_bucket_view=False, forward_sync_buffers=None):
            pass

    class OldDDP:  # torch 2.0 (the K80 stack): no forward_sync_buffers
        def __init__(self, module, broadcast_buffers=True, gradient_as_bucket_view=False):
            pass

    assert ddp_kwargs(NewDDP).to_kwargs() == {"forward_sync_buffers": False, "gradient_as_bucket_view": True}
    assert ddp_kwargs(OldDDP).to_kwargs() == {"broadcast_buffers": False, "gradient_as_bucket_view": True}


def test_warnings_are_silenced_on_every_rank_but_the_first():
    import warnings

    from gan_ddp.runtime.distributed import main_process_warnings_only

    for env, silenced in (({}, False), ({"RANK": "0"}, False), ({"RANK": "1"}, True), ({"RANK": "7"}, True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main_process_warnings_only(env)
            warnings.warn("from a library", FutureWarning, stacklevel=1)
        assert (not caught) == silenced, env


def test_unwrap_returns_a_plain_model_without_importing_dynamo_and_unwraps_a_wrapped_one(tmp_path):
    """`distributed.unwrap` spares `gan-ddp eval` the ~1.3 CPU-s of importing TorchDynamo that Accelerate's
    unwrap_model costs (it asks `torch._dynamo` whether the model is compiled); a wrapped model still unwraps."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys
        import torch
        from gan_ddp.runtime.distributed import make_accelerator, unwrap
        before = "torch._dynamo" in sys.modules  # torch 2.0 loads it with torch; 2.1+ lazily
        acc = make_accelerator("no")
        net = torch.nn.Linear(2, 2)
        assert unwrap(acc, net) is net
        assert ("torch._dynamo" in sys.modules) == before, "unwrap imported TorchDynamo"
        assert unwrap(acc, torch.nn.DataParallel(net)) is net  # a wrapper: Accelerate's unwrap
        assert acc.unwrap_model(net) is net  # what unwrap stands for
        print("ok", before)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout + proc.stderr[-2000:]
