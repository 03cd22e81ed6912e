"""gan_ddp.runtime.compat: what each supported torch version can do, answered without installing it, and the
shim that lets Accelerate set up multi-process CPU runs on torch 2.0 (the K80 stack)."""

from __future__ import annotations

import pytest
import torch

from gan_ddp.runtime import compat


@pytest.mark.parametrize(
    ("device", "version", "expected"),
    [("cuda", "2.0.1+cu117", True), ("cpu", "2.0.1", False), ("cpu", "2.3.1", False), ("cpu", "2.4.0", True),
     ("cpu", "2.14.1+cu130", True), ("mps", "2.14.1", False)],
)  # fmt: skip
def test_fused_adam_only_where_torch_has_it(device, version, expected):
    assert compat.fused_adam(device, version) is expected


def test_fused_adam_answer_matches_the_running_torch():
    """The guard's answer for this torch must be what Adam really does on CPU."""
    param = torch.nn.Parameter(torch.zeros(3))
    if compat.fused_adam("cpu"):
        torch.optim.Adam([param], fused=True).step()
    else:
        with pytest.raises(RuntimeError):
            opt = torch.optim.Adam([param], fused=True)
            param.grad = torch.ones(3)
            opt.step()


def test_compile_refused_on_torch_2_0_with_python_3_11():
    reason = compat.compile_unsupported("2.0.1", (3, 11))
    assert reason and "up to Python 3.10" in reason
    assert compat.compile_unsupported("2.0.1", (3, 10)) is None
    assert compat.compile_unsupported("2.5.0", (3, 11)) is None


def test_shim_adds_torch_cpu_device_count_only_where_missing(monkeypatch):
    original = getattr(torch.cpu, "device_count", None)
    monkeypatch.delattr(torch.cpu, "device_count", raising=False)  # torch 2.0
    compat.install_shims()
    assert torch.cpu.device_count() == 1  # what torch >= 2.1 answers
    if original is not None:
        monkeypatch.setattr(torch.cpu, "device_count", original)
        compat.install_shims()
        assert torch.cpu.device_count is original  # a real one is never replaced


def test_arch_flags_are_sm_or_compute_names():
    flags = compat.cuda_arch_flags()
    assert all(f.startswith(("sm_", "compute_")) for f in flags)
    assert bool(flags) == torch.backends.cuda.is_built()


def test_reduce_overhead_is_refused_on_cpu_with_one_line(tmp_path, capsys, mnist_root):
    """CUDA graphs need a GPU: on CPU the lever is refused before training starts (exit 2)."""
    from gan_ddp.commands import cli

    code = cli.main(
        ["train", "--config", "configs/smoke.yaml", f"data.root={mnist_root}", "data.split=test",
         f"run.dir={tmp_path}", "log.wandb=disabled", "train.compile=true", "train.compile_mode=reduce-overhead"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    if compat.compile_unsupported():
        assert err[0].startswith("error: train.compile: ")
    else:
        assert err[0].startswith("error: train.compile_mode: reduce-overhead captures CUDA graphs and needs a GPU")


def test_process_group_teardown_waits_for_gloo_workers_first(monkeypatch) -> None:
    """torch < 2.1: destroying a gloo group right after a collective can deadlock on the GIL; the wrapper
    installed by `install_shims` waits (GIL released) first, then destroys, once however often installed."""
    import torch.distributed as dist

    from gan_ddp.runtime import compat

    events: list[str] = []
    monkeypatch.setattr(dist, "destroy_process_group", lambda group=None: events.append(f"destroy {group}"))
    monkeypatch.setattr(compat.time, "sleep", lambda s: events.append(f"sleep {s}"))
    compat._settle_gloo_before_teardown()
    compat._settle_gloo_before_teardown()  # idempotent: no second wrapper
    dist.destroy_process_group("g")
    assert events == [f"sleep {compat.GLOO_SETTLE_S}", "destroy g"]
