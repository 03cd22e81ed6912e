#!/usr/bin/env bash
# Training on one machine with N GPUs (a workstation, an EC2 p3/p4d/p5/g5 box).
#
#   bash launch/gpu_local.sh --config configs/mnist_mlp.yaml run.dir=runs/gpu
#   NGPUS=4 PRECISION=fp16 bash launch/gpu_local.sh --config configs/mnist_mlp.yaml
#
# Environment (all optional):
#   NGPUS      processes, one per GPU (default: the GPUs in CUDA_VISIBLE_DEVICES,
#              else every GPU `nvidia-smi -L` lists, else torch.cuda.device_count())
#   PRECISION  auto (default) | no | fp16 | bf16. auto: the trainer picks (bf16 on
#              compute capability >= 8.0, fp16 + GradScaler on 7.x and 6.0, fp32
#              below, e.g. K80; docs/gpus.md). Anything else
#              is passed as both --mixed_precision and train.precision=... (after
#              your arguments, so it wins).
#   MASTER_PORT  rendezvous port (default 0 = any free port)
#   PYTHON     interpreter (default: .venv/bin/python if present, else python)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds the workers get to checkpoint after
#              SIGTERM before the launcher kills them (default 90)
# All arguments go to `gan_ddp train` unchanged.
#
# NGPUS=1 runs the trainer directly (no launcher process in between).
# Exit code: the trainer's (0 done, 2 bad config/data); 75 if this script got
# SIGTERM/SIGINT/SIGUSR1 (e.g. from a spot-interruption watcher, see ec2.md)
# and the run checkpointed: run the same command again to resume.
set -euo pipefail
# shellcheck source=SCRIPTDIR/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

PYTHON=$(pick_python)
PRECISION=${PRECISION:-auto}
MASTER_PORT=${MASTER_PORT:-0}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-90}

if [[ -z ${NGPUS:-} ]]; then
  read -r NGPUS _ < <(count_gpus "$PYTHON")
fi
if ((NGPUS < 1)); then
  echo "gpu_local.sh: no GPU found (set NGPUS, or use launch/run.sh, which picks for the machine)" >&2
  exit 2
fi

acc_precision=()
train_precision=()
case $PRECISION in
  auto) ;;
  no | fp16 | bf16)
    acc_precision=(--mixed_precision "$PRECISION")
    train_precision=("train.precision=$PRECISION")
    ;;
  *)
    echo "gpu_local.sh: PRECISION must be auto, no, fp16 or bf16 (got '$PRECISION')" >&2
    exit 2
    ;;
esac

echo "[gpu_local] $NGPUS GPU process(es), precision $PRECISION, python: $PYTHON" >&2
if ((NGPUS == 1)); then
  run_preemptible "$PYTHON" -m gan_ddp train "$@" "${train_precision[@]}"
else
  # `python -m accelerate.commands.launch` == `accelerate launch`, from the chosen interpreter.
  run_preemptible "$PYTHON" -m accelerate.commands.launch \
    --multi_gpu --num_processes "$NGPUS" --num_machines 1 \
    --main_process_port "$MASTER_PORT" --dynamo_backend no "${acc_precision[@]}" \
    -m gan_ddp train "$@" "${train_precision[@]}"
fi
