"""Distributed training proven on CPU processes (gloo): identical weights, disjoint shards, equivalence
with one process, BatchNorm under DDP, the launch guard, multi-node rendezvous, preemption of one rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from _runs import (
    ONE_MACHINE,
    REPO,
    assert_same_tensors,
    assert_two_processes_match_one,
    base_env,
    checkpoint_tensors,
    free_port,
    losses_by_step,
    metric_lines,
    newest_checkpoint,
    torchrun,
    torchrun_cmd,
    train_cmd,
    train_inproc,
)

pytestmark = pytest.mark.multiprocess

# 5 global steps per epoch (2000 of the 10k test images a step): short runs cross epochs.
SHORT = ("train.batch_size=2000", "train.epochs=100", "log.every=2", "log.sample_every=5", "checkpoint.every=4")


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def assert_no_python_warnings(stderr: str) -> None:
    """A normal run's log has no library warnings (the torch 2.14 DDP FutureWarning used to come once per rank)."""
    kinds = ("FutureWarning", "DeprecationWarning", "UserWarning", "RuntimeWarning", "PendingDeprecationWarning")
    found = [line for line in stderr.splitlines() if any(kind in line for kind in kinds)]
    assert not found, "\n".join(found)


def run_script(tmp_path, body: str, nproc: int = 2) -> subprocess.CompletedProcess:
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent(body))
    cmd = [sys.executable, "-m", "torch.distributed.run", *ONE_MACHINE, "--nproc_per_node", str(nproc), str(script)]
    return subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=300)


def test_two_processes_identical_weights_and_global_metrics(tmp_path):
    run = tmp_path / "run"
    out = ok(torchrun(2, train_cmd(run, *SHORT, "train.steps=9", "train.check_consistency=true", "log.plots=true")))
    assert "DDP consistency check passed" in out.stdout
    assert_no_python_warnings(out.stderr)
    lines = metric_lines(run)
    assert lines and all(m["world_size"] == 2 for m in lines)
    assert [m["step"] for m in lines] == [2, 4, 6, 8, 9]
    # One process wrote files: one config, grids named by step, checkpoints with one RNG file per rank.
    assert {p.name for p in newest_checkpoint(run).glob("rng_*.json")} == {"rng_0.json", "rng_1.json"}
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["losses.png", "scores.png"]  # by rank 0, at the end
    assert (run / "samples" / "progress.gif").is_file()


def test_consistency_check_names_the_differing_tensor(tmp_path):
    out = run_script(
        tmp_path,
        """
        import torch
        from accelerate import Accelerator
        from gan_ddp.runtime.distributed import ConsistencyError, check_consistency
        acc = Accelerator(cpu=True)
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
        assert check_consistency(acc, {"D": net}, step=1) == 4
        if acc.process_index == 1:
            with torch.no_grad():
                net[1].weight[0, 2] += 1e-6
        try:
            check_consistency(acc, {"D": net}, step=2)
        except ConsistencyError as exc:
            print(f"rank{acc.process_index}: {exc}")
        acc.end_training()
        """,
    )
    ok(out)
    assert out.stdout.count("D.1.weight differs between rank 0 and rank 1") == 2
    assert "at step 2" in out.stdout


def test_shards_are_disjoint_cover_the_data_and_reshuffle(tmp_path):
    out = run_script(
        tmp_path,
        """
        import json, torch
        from accelerate import Accelerator
        from gan_ddp.components.data import ImageTensorDataset
        from gan_ddp.components.data import make_train_loader
        acc = Accelerator(cpu=True, rng_types=[])
        n, B = 1003, 100  # 10 global steps per epoch, 3 images left over
        ds = ImageTensorDataset(torch.zeros(n, 28, 28, dtype=torch.uint8), torch.arange(n))  # label = index
        loader = acc.prepare(make_train_loader(ds, B, B // acc.num_processes, seed=5))
        epochs = []
        for epoch in range(2):
            loader.set_epoch(epoch)
            mine = [batch[1].tolist() for batch in loader]
            everyone = [None] * acc.num_processes
            torch.distributed.all_gather_object(everyone, mine)
            epochs.append(everyone)
        if acc.is_main_process:
            print("RESULT " + json.dumps(epochs))
        acc.end_training()
        """,
    )
    ok(out)
    epochs = json.loads(out.stdout.split("RESULT ", 1)[1])
    # The one-process order of the same sampler: global step k covers permutation[k*B:(k+1)*B].
    import torch

    from gan_ddp.components.data import EpochSampler

    single = EpochSampler(1003, 100, seed=5)
    orders = []
    for epoch, ranks in enumerate(epochs):
        r0, r1 = ({i for batch in r for i in batch} for r in ranks)
        assert not r0 & r1, "ranks saw the same image in one epoch"
        assert len(r0) == len(r1) == 500 and len(r0 | r1) == 1000
        single.set_epoch(epoch)
        order = list(single)
        for k, (a, b) in enumerate(zip(*ranks, strict=True)):
            assert sorted(a + b) == sorted(order[k * 100 : (k + 1) * 100])
        orders.append(order)
    assert orders[0] != orders[1], "a new epoch must reshuffle"
    assert torch.tensor(orders[0]).unique().numel() == 1000


def test_two_processes_match_one_process(tmp_path):
    """Dropout off: noise and data order depend on the global sample index, so 2 x 1000 == 1 x 2000."""
    assert_two_processes_match_one(tmp_path, *SHORT, "train.steps=6", "model.dropout=0.0")


def test_resume_is_exact_with_two_processes(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    ok(torchrun(2, train_cmd(straight, *SHORT, "train.steps=14")))
    ok(torchrun(2, train_cmd(split, *SHORT, "train.steps=7")))  # epoch 1, batch 2
    out = ok(torchrun(2, train_cmd(split, *SHORT, "train.steps=14")))
    assert "resumed from" in out.stdout
    assert_same_tensors(checkpoint_tensors(newest_checkpoint(straight)), checkpoint_tensors(newest_checkpoint(split)))
    assert losses_by_step(straight, after=7) == losses_by_step(split, after=7)


def test_resume_with_another_process_count(tmp_path, capsys):
    """Saved by 2 processes, resumed by 1: a note says what continues exactly; with dropout off (nothing
    depends on per-rank random streams) the result matches one process throughout, to float tolerance."""
    common = (*SHORT, "model.dropout=0.0")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_inproc(straight, *common, "train.steps=10") == 0
    ok(torchrun(2, train_cmd(split, *common, "train.steps=5")))
    capsys.readouterr()
    assert train_inproc(split, *common, "train.steps=10") == 0
    out = capsys.readouterr().out
    assert "saved by 2 process(es), resuming with 1" in out and "resumed from" in out
    one, resumed = checkpoint_tensors(newest_checkpoint(straight)), checkpoint_tensors(newest_checkpoint(split))
    assert_same_tensors(
        {k: v for k, v in one.items() if not k.startswith("optimizer")},
        {k: v for k, v in resumed.items() if not k.startswith("optimizer")},
        atol=2e-5,
    )
    a, b = losses_by_step(straight, after=5), losses_by_step(split, after=5)
    assert a.keys() == b.keys() and a
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-4)


def test_dcgan_batchnorm_trains_under_ddp(tmp_path):
    run = tmp_path / "run"
    dcgan = REPO / "configs" / "mnist_dcgan.yaml"
    args = train_cmd(run, "train.batch_size=64", "train.steps=4", "log.every=2", "log.sample_every=2",
                     "model.g_channels=16", "model.d_channels=8", "train.precision=no", "train.check_consistency=true",
                     "checkpoint.every=4", config=dcgan)  # fmt: skip
    out = ok(torchrun(2, args))
    assert "DDP consistency check passed" in out.stdout
    assert_no_python_warnings(out.stderr)
    assert all(m["world_size"] == 2 for m in metric_lines(run))


def accelerate_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--main_process_port", str(free_port()), *args]  # fmt: skip


def test_accelerate_multi_gpu_launch_without_gpus_is_really_distributed(tmp_path):
    """The NOTES' silent failure: we build the Accelerator with cpu=True, so this launch trains as 2 ranks."""
    env = base_env()
    env.pop("ACCELERATE_USE_CPU", None)
    run = tmp_path / "run"
    ok(subprocess.run(accelerate_cmd("-m", "gan_ddp", *train_cmd(run, *SHORT, "train.steps=2")),
                      cwd=REPO, env=env, capture_output=True, text=True, timeout=300))  # fmt: skip
    assert {m["world_size"] for m in metric_lines(run)} == {2}


def test_guard_refuses_a_launch_that_would_train_alone(tmp_path):
    """Force the failure state (an Accelerator built without cpu=True on a machine without GPUs)."""
    script = tmp_path / "forced.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            import accelerate
            original = accelerate.Accelerator.__init__
            LAUNCH = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
            def without_cpu(self, *args, **kwargs):  # what a plain Accelerator() does without GPUs
                kwargs["cpu"] = False
                # Accelerate <= 1.10 (the K80 stack) sets up MULTI_CPU even so; hiding the launcher's
                # variables while it builds its state gives the same failure state on every version.
                saved = {k: os.environ.pop(k) for k in LAUNCH if k in os.environ}
                try:
                    original(self, *args, **kwargs)
                finally:
                    os.environ.update(saved)
            accelerate.Accelerator.__init__ = without_cpu
            from gan_ddp.commands.cli import main
            sys.exit(main(sys.argv[1:]))
            """
        )
    )
    env = base_env()
    env.pop("ACCELERATE_USE_CPU", None)
    out = subprocess.run(accelerate_cmd(str(script), *train_cmd(tmp_path / "run", "train.steps=2")),
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode != 0
    assert "error: the launcher started 2 processes (WORLD_SIZE=2) but Accelerate set up 1" in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_two_nodes_on_one_machine(tmp_path):
    run, port = tmp_path / "run", free_port()
    procs = []
    for node in range(2):
        rdzv = ("--nnodes", "2", "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port))
        cmd = torchrun_cmd(1, train_cmd(run, *SHORT, "train.steps=4"), extra=rdzv)
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert {m["world_size"] for m in metric_lines(run)} == {2}


@pytest.mark.parametrize("target", ["one rank", "launcher"])
def test_sigterm_checkpoints_and_resume_matches_uninterrupted(tmp_path, target):
    run = tmp_path / "run"
    args = train_cmd(run, *SHORT, "train.steps=400", "log.every=1", "checkpoint.every=1000")
    launcher = subprocess.Popen(torchrun_cmd(2, args), cwd=REPO, env=base_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    workers = [c for c in psutil.Process(launcher.pid).children(recursive=True) if "gan_ddp" in " ".join(c.cmdline())]
    assert len(workers) == 2
    if target == "one rank":
        os.kill(workers[-1].pid, signal.SIGTERM)  # the signal reaches rank 1 only: the ranks must agree
    else:
        launcher.send_signal(signal.SIGTERM)  # torchrun forwards it to every worker
    output = launcher.communicate(timeout=180)[0]
    assert "stop requested by signal" in output, output[-3000:]
    if target == "one rank":  # torchrun reports the workers' code; its own is 1 (hence the PREEMPTED marker)
        assert "exitcode  : 75" in output, output[-3000:]
    assert (run / "PREEMPTED").exists()
    stopped = json.loads((newest_checkpoint(run) / "trainer_state.json").read_text())["step"]
    assert 0 < stopped < 400

    final = stopped + 3
    ok(torchrun(2, train_cmd(run, *SHORT, f"train.steps={final}", "log.every=1", "checkpoint.every=1000")))
    straight = tmp_path / "straight"
    ok(torchrun(2, train_cmd(straight, *SHORT, f"train.steps={final}", "log.every=1", "checkpoint.every=1000")))
    assert_same_tensors(checkpoint_tensors(newest_checkpoint(straight)), checkpoint_tensors(newest_checkpoint(run)))
