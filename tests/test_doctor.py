"""`gan-ddp doctor` and train's start-up kernel check, on made-up machines (no GPU needed): architecture
matching, install advice, precision and launch lines, exit codes; then the real command on this machine."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from gan_ddp.runtime import doctor
from gan_ddp.runtime.doctor import GPU, K80_STACK_ARCHS, GPUSupportError, Machine, has_kernels

DEFAULT_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]  # torch 2.14.1+cu130, measured here
K80 = GPU(0, "Tesla K80", (3, 7), 11.2)
H100 = GPU(0, "NVIDIA H100 80GB HBM3", (9, 0), 79.1)


def machine(archs=DEFAULT_ARCHS, gpus=(), **kw) -> Machine:
    facts = dict(torch="2.14.1+cu130", cuda="13.0", cudnn=92400, archs=list(archs), gpus=list(gpus))
    facts.update(cuda_available=bool(gpus), nccl="2.30.7", cpus=8, python="3.11.7", accelerate="1.15.0")
    facts.update(kw)
    return Machine(**facts)


@pytest.mark.parametrize(
    ("capability", "archs", "expected"),
    [
        ((3, 7), K80_STACK_ARCHS, True),  # the K80 stack
        ((3, 7), DEFAULT_ARCHS, False),  # a K80 under current torch
        ((7, 0), DEFAULT_ARCHS, False),  # V100 under a CUDA 13 build
        ((8, 9), ["sm_80", "sm_86"], True),  # cubins run on later minors of the same major (L4 on sm_86)
        ((8, 0), ["sm_86"], False),  # ...never on earlier ones
        ((10, 0), ["sm_80", "sm_90"], False),  # ...nor on another major
        ((10, 0), ["sm_80", "compute_90"], True),  # PTX is compiled by the driver for anything newer
        ((8, 6), ["compute_90"], False),
        ((9, 0), ["sm_90a"], True),
    ],
)
def test_kernels_match_by_cuda_binary_compatibility(capability, archs, expected):
    assert has_kernels(capability, list(archs)) is expected


def test_k80_under_the_default_stack_is_told_exactly_what_to_install():
    m = machine(gpus=[K80, GPU(1, "Tesla K80", (3, 7), 11.2)])
    problems = doctor.kernel_problems(m)
    assert len(problems) == 2
    assert "GPU 0 (Tesla K80, compute capability 3.7) has no kernels" in problems[0]
    assert "make install STACK=k80" in problems[0]
    out = io.StringIO()
    assert doctor.run_doctor(m, out) == doctor.EXIT_UNUSABLE
    text = out.getvalue()
    assert "kernels in this build: no" in text
    assert "train.precision=auto -> no (auto: CUDA compute capability 3.7" in text  # fp32 on Kepler
    assert text.count("error: ") == 2
    with pytest.raises(GPUSupportError, match=r"STACK=k80.*\(and 1 more GPU\(s\) alike\)$") as err:
        doctor.check_gpu_kernels(m)
    assert "\n" not in str(err.value)


def test_k80_under_the_k80_stack_is_fine():
    m = machine(archs=K80_STACK_ARCHS, gpus=[K80], torch="2.0.1+cu117", cuda="11.7", cudnn=8500)
    out = io.StringIO()
    assert doctor.run_doctor(m, out) == doctor.EXIT_OK
    assert "kernels in this build: yes" in out.getvalue()
    assert "launch       bash launch/gpu_local.sh" in out.getvalue()
    doctor.check_gpu_kernels(m)  # no error


def test_gpu_newer_than_the_k80_stack_gets_other_advice():
    problem = doctor.kernel_problems(machine(archs=K80_STACK_ARCHS, gpus=[H100]))[0]
    assert "sm_90" in problem and "STACK=k80" not in problem


def test_eight_h100s_bf16_and_the_multi_gpu_launch():
    m = machine(gpus=[GPU(i, H100.name, (9, 0), 79.1) for i in range(8)])
    lines = doctor.render(m)
    assert sum(line.startswith("GPU ") for line in lines) == 8
    assert any("-> bf16" in line for line in lines)
    assert any("8 GPUs" in line and "torchrun --nproc_per_node 8" in line for line in lines)


def test_no_gpu_cpu_launch_and_precision():
    text = "\n".join(doctor.render(machine(archs=[], cuda=None, cudnn=None, nccl=None, cpu_bf16=True)))
    assert "GPUs         none visible" in text
    assert "CUDA build   none (CPU-only build)" in text and "NCCL not available" in text
    assert "-> bf16 (auto: CPU with native bf16" in text
    assert "cpu_multiproc.sh" in text


def test_driver_that_torch_cannot_use_is_reported_unless_gpus_are_hidden(monkeypatch):
    m = machine(driver="470.256.02")  # a p2 box: driver 470, CUDA 13 build, torch sees no GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    problem = doctor.driver_problem(m)
    assert problem and "470.256.02" in problem and "STACK=k80" in problem
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # launch/cpu_multiproc.sh hides GPUs on purpose
    assert doctor.driver_problem(m) is None


def test_train_refuses_a_driver_this_build_cannot_use(monkeypatch):
    """A p2 box under the default stack: driver 470 loaded, torch sees no GPU; training would silently run
    on the CPU, so the start-up check refuses, unless GPUs are hidden on purpose."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(doctor, "loaded_driver", lambda: "470.256.02")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(GPUSupportError, match=r"driver 470\.256\.02 .*STACK=k80.*CUDA_VISIBLE_DEVICES=$"):
        doctor.check_gpu_kernels()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    doctor.check_gpu_kernels()  # CPU on purpose
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(doctor, "loaded_driver", lambda: None)
    doctor.check_gpu_kernels()  # no driver: a CPU machine


def test_gather_reads_every_gpu_through_torch(monkeypatch):
    """gather() with torch.cuda mocked: a two-GPU K80 box under the default build."""
    import torch

    props = SimpleNamespace(name="Tesla K80", major=3, minor=7, total_memory=12 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    monkeypatch.setattr(doctor.compat, "cuda_arch_flags", lambda: list(DEFAULT_ARCHS))
    m = doctor.gather()
    assert [(g.index, g.name, g.capability, g.memory_gib) for g in m.gpus] == [
        (0, "Tesla K80", (3, 7), 12.0),
        (1, "Tesla K80", (3, 7), 12.0),
    ]
    with pytest.raises(GPUSupportError, match="make install STACK=k80"):
        doctor.check_gpu_kernels()  # what `gan-ddp train` runs first


def test_train_refuses_a_gpu_without_kernels_with_one_line(monkeypatch, tmp_path, capsys):
    from gan_ddp.commands import cli
    from gan_ddp.training import builder

    def refuse():
        raise GPUSupportError(doctor.kernel_problems(machine(gpus=[K80]))[0])

    monkeypatch.setattr(builder, "check_gpu_kernels", refuse)
    code = cli.main(["train", "--config", "configs/smoke.yaml", f"run.dir={tmp_path}", "log.wandb=disabled"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: GPU 0 (Tesla K80") and "STACK=k80" in err[0]
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_doctor_runs_on_this_machine(run_cli):
    result = run_cli("doctor", check=False)
    assert result.returncode in (0, 2), result.stderr
    for label in ("torch", "CUDA build", "kernels for", "collectives", "precision", "launch"):
        assert label in result.stdout
    import torch

    if not torch.cuda.is_available():
        assert "GPUs         none visible" in result.stdout
