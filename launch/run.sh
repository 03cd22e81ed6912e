#!/usr/bin/env bash
# One command for any machine: looks at the GPUs and starts `gan_ddp train` the way that fits.
#
#   bash launch/run.sh --config configs/mnist_mlp.yaml run.dir=runs/mine [key=value ...]
#   make launch CONFIG=configs/mnist_mlp.yaml ARGS="run.dir=runs/mine"
#
#   GPUs seen   what runs
#   N >= 2      `accelerate launch --multi_gpu --num_processes N`, one process per GPU (launch/gpu_local.sh)
#   1           the trainer directly on that GPU (launch/gpu_local.sh)
#   0           the trainer as ONE process on the CPU, using every core (train.threads defaults to
#               cores / processes). Several CPU processes only share the same cores and add gloo
#               all-reduces: measured 0.48-0.61x the speed of one process (docs/speed.md). To run DDP on
#               CPU anyway (tests, trying the distributed code): launch/cpu_multiproc.sh.
#
# GPUs seen: NGPUS if set, else CUDA_VISIBLE_DEVICES (empty hides all), else `nvidia-smi -L`, else
# torch.cuda.device_count(). The first line on stderr says what was chosen and why.
#
# Environment (all optional): NGPUS, PRECISION (auto|no|fp16|bf16, GPUs only; see gpu_local.sh),
# PYTHON, MASTER_PORT, TORCH_ELASTIC_SHUTDOWN_TIMEOUT, and DRY_RUN=1 to print the decision and the
# command without running it.
# All arguments go to `gan_ddp train` unchanged. Signals and exit codes as in the other scripts: 0 done,
# 2 bad config/data, 75 stopped by SIGTERM/SIGINT/SIGUSR1 with a checkpoint (run the same command again
# to resume); see launch/_common.sh and launch/README.md.
set -euo pipefail
here=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=SCRIPTDIR/_common.sh
source "$here/_common.sh"

PYTHON=$(pick_python)
if [[ -n ${NGPUS:-} ]]; then
  how="NGPUS=$NGPUS"
else
  read -r NGPUS how < <(count_gpus "$PYTHON")
fi
if ! [[ $NGPUS =~ ^[0-9]+$ ]]; then
  echo "error: launch/run.sh: NGPUS must be a whole number of GPUs (got '$NGPUS')" >&2
  exit 2
fi
cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)

if ((NGPUS >= 1)); then
  why="$NGPUS GPUs: accelerate launch --multi_gpu, one process per GPU"
  ((NGPUS > 1)) || why="1 GPU: the trainer directly, no launcher"
  echo "[run] $NGPUS GPU(s) per $how -> $why (launch/gpu_local.sh)" >&2
  # gpu_local.sh forwards signals and maps exit codes itself; exec, so that it gets the signals directly.
  NGPUS=$NGPUS exec bash "$here/gpu_local.sh" "$@"
fi
echo "[run] 0 GPUs per $how -> CPU: 1 process x $cores cores (fastest on CPU; DDP on CPU: launch/cpu_multiproc.sh)" >&2
run_preemptible "$PYTHON" -m gan_ddp train "$@"
