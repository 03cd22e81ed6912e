#!/usr/bin/env bash
# Multi-process (DDP, gloo) training on CPU, one machine. For newcomers without
# GPUs and for the tests. GPUs are hidden, even where there are some.
#
#   bash launch/cpu_multiproc.sh --config configs/mnist_mlp.yaml run.dir=runs/cpu
#   NPROC=4 bash launch/cpu_multiproc.sh --config configs/mnist_mlp.yaml train.batch_size=256
#
# Environment (all optional):
#   NPROC            processes (default 2); train.batch_size stays the GLOBAL batch
#   OMP_NUM_THREADS  threads per process (default: max(1, cores / NPROC))
#   PYTHON           interpreter (default: .venv/bin/python if present, else python)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds the workers get to checkpoint after
#                    SIGTERM before torchrun kills them (default 60)
# All arguments go to `gan_ddp train` unchanged.
#
# Why torchrun and not `accelerate launch`: without GPUs, `accelerate launch
# --multi_gpu` needs ACCELERATE_USE_CPU=true, and `--cpu` / MULTI_CPU configs
# need MPI for more than one process. torchrun just works; the trainer sees no
# GPU and builds its Accelerator with cpu=True.
#
# Exit code: the trainer's (0 done, 2 bad config/data); 75 if this script got
# SIGTERM/SIGINT/SIGUSR1 and the run checkpointed (run the same command again
# to resume); anything else = crash. See launch/_common.sh.
set -euo pipefail
# shellcheck source=SCRIPTDIR/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

NPROC=${NPROC:-2}
PYTHON=$(pick_python)
cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
threads=$((cores / NPROC))
((threads >= 1)) || threads=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-60}
export CUDA_VISIBLE_DEVICES=""

echo "[cpu_multiproc] $NPROC processes x $OMP_NUM_THREADS threads, python: $PYTHON" >&2
# `python -m torch.distributed.run` == torchrun, but from the chosen interpreter.
# One machine, rendezvous on a free local port, so parallel runs are fine. torch 2.1+ spells `--standalone` so;
# torch 2.0 (the K80 stack) gives `--standalone` the fixed port 29400, where a second run joins the first's store.
run_preemptible "$PYTHON" -m torch.distributed.run --nnodes 1 --rdzv-backend c10d --rdzv-endpoint localhost:0 \
  --nproc_per_node "$NPROC" \
  -m gan_ddp train "$@"
