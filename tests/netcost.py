"""What the network costs a training step: `gan-ddp bench` and a bare all-reduce of the step's gradient volume,
on 1 node x 2 processes, 2 nodes x 1 and 2 nodes x 2 (gloo, CPU), between simulated hosts (tests/_slurm.py)
whose links are unshaped or limited with tbf. Root only; prints a Markdown table (docs/launch.md has one).

    PYTHONPATH=. python tests/netcost.py [--config configs/mnist_mlp.yaml] [--rates none,10gbit,1gbit]

Not a test (minutes of CPU); the cluster tests cover correctness. The all-reduce figure times `all_reduce` of
one flat fp32 tensor with as many elements as G and D have parameters (what DDP all-reduces per iteration: D's
gradients in the D step, G's in the G step), median of 20 after 3 warm-ups; DDP overlaps part of it with
backward, so the step time grows by at most that much.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _runs import REPO
from _slurm import SimulatedHosts


def _probe_script(path: Path) -> None:
    path.write_text(
        "import json, os, statistics, sys, time\n"
        "import torch, torch.distributed as dist\n"
        "dist.init_process_group('gloo')\n"
        "n = int(sys.argv[1])\n"
        "x = torch.ones(n)\n"
        "times = []\n"
        "for i in range(23):\n"
        "    dist.barrier()\n"
        "    t = time.perf_counter()\n"
        "    dist.all_reduce(x)\n"
        "    times.append(time.perf_counter() - t)\n"
        "t = torch.tensor([statistics.median(times[3:])])\n"
        "dist.all_reduce(t, op=dist.ReduceOp.MAX)\n"
        "if dist.get_rank() == 0:\n"
        "    json.dump({'allreduce_ms': 1000 * t.item(), 'elements': n}, open(sys.argv[2], 'w'))\n"
        "dist.destroy_process_group()\n"
    )


def _n_params(config: str) -> int:
    code = (
        "import sys\nfrom gan_ddp.config import load_config\n"
        "from gan_ddp.components.models import build_models, count_parameters\n"
        "g, d = build_models(load_config(sys.argv[1], []).model)\nprint(count_parameters(g) + count_parameters(d))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, config], capture_output=True, text=True, cwd=REPO, check=True)
    return int(out.stdout.split()[-1])


def _launch(hosts: SimulatedHosts, nodes: int, per_node: int, script: list[str], port: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    procs = []
    for k in range(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc_per_node", str(per_node)]
        cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{hosts.names[0]}:{port}", "--rdzv_id", str(port)]
        procs.append(
            subprocess.Popen(
                hosts.wrap(k, [*cmd, *script]),
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit("a run failed:\n" + "\n---\n".join(o[-3000:] for o in outs))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/mnist_mlp.yaml")
    parser.add_argument("--rates", default="none,10gbit,1gbit")
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    n = _n_params(args.config)
    work = Path(tempfile.mkdtemp(prefix="gdtest-netcost-"))
    probe = work / "probe.py"
    _probe_script(probe)
    hosts = SimulatedHosts(2, work).start()
    rows = []
    port = 29611
    try:
        for rate in args.rates.split(","):
            hosts.shape(None if rate == "none" else rate)
            for nodes, per_node in ((1, 2), (2, 1), (2, 2)):
                if nodes == 1 and rate != "none":
                    continue  # one node: loopback, no link to shape
                port += 1
                out = work / f"bench-{rate}-{nodes}x{per_node}.json"
                bench = [
                    "-m",
                    "gan_ddp",
                    "bench",
                    "--config",
                    args.config,
                    "--json",
                    str(out),
                    "--iters",
                    str(args.iters),
                ]
                bench += ["--warmup", "5", "--repeat", "3", "train.threads=1", "data.root=bundled", "data.split=test"]
                _launch(hosts, nodes, per_node, bench, port)
                port += 1
                ar = work / f"ar-{rate}-{nodes}x{per_node}.json"
                _launch(hosts, nodes, per_node, [str(probe), str(n), str(ar)], port)
                b, a = json.loads(out.read_text()), json.loads(ar.read_text())
                rows.append(
                    (rate, nodes, per_node, b["ms_per_iter"], b["img_per_s"], b["img_per_s_best"], a["allreduce_ms"])
                )
                print(rows[-1], flush=True)
    finally:
        hosts.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.config}: {n:,} parameters (G + D) = {4 * n / 1e6:.1f} MB fp32 all-reduced per iteration\n")
    print("| link | nodes x processes | ms / iteration | images/s (best window) | all-reduce ms / iteration |")
    print("|---|---|---|---|---|")
    for rate, nodes, per_node, ms, ips, best, ar in rows:
        link = "loopback" if nodes == 1 else ("veth, unshaped" if rate == "none" else f"veth, tbf {rate}")
        print(f"| {link} | {nodes} x {per_node} | {ms:.1f} | {ips:,.0f} ({best:,.0f}) | {ar:.1f} |")


if __name__ == "__main__":
    main()
