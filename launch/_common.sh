# shellcheck shell=bash
# Helpers sourced by launch/run.sh, launch/cpu_multiproc.sh and launch/gpu_local.sh (not run directly).

# Python to use: $PYTHON if set, else the repo's .venv (what `make install`
# creates) if present, else whatever `python` is on PATH.
pick_python() {
  local repo
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if [[ -n ${PYTHON:-} ]]; then
    echo "$PYTHON"
  elif [[ -x $repo/.venv/bin/python ]]; then
    echo "$repo/.venv/bin/python"
  else
    echo python
  fi
}

# count_gpus PYTHON: prints "N how-it-was-counted" for the GPUs this machine offers the trainer.
# CUDA_VISIBLE_DEVICES when set (an empty value hides every GPU), else `nvidia-smi -L`, else (no
# nvidia-smi, e.g. a ROCm box or a container without it) torch.cuda.device_count() from PYTHON.
count_gpus() {
  local n visible
  if [[ -v CUDA_VISIBLE_DEVICES ]]; then
    IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#visible[@]} CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES'"
  elif command -v nvidia-smi >/dev/null; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    echo "${n:-0} nvidia-smi -L"
  else
    n=$("$1" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || true)
    echo "${n:-0} torch.cuda.device_count(), no nvidia-smi"
  fi
}

# run_preemptible CMD [ARGS...]
#
# Runs CMD (a launcher: torchrun or accelerate, or the trainer itself) and
# returns its exit code (with DRY_RUN=1 it only prints CMD), with two fixes for preemption:
#
#  * CMD runs in its own process group (set -m), so a Ctrl-C in the terminal or
#    a signal to this script's process group reaches only this script. Whatever
#    this script gets (SIGTERM, SIGINT, SIGUSR1) it forwards ONCE to the launcher
#    as SIGTERM. torchrun/accelerate pass SIGTERM on to every training process
#    and wait for them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, then SIGKILL);
#    the trainer finishes its step, writes a checkpoint and exits 75.
#    (A second signal is not forwarded: torchrun aborts its own orderly shutdown
#    if it is signalled again.)
#  * torchrun/accelerate report any failed worker as exit code 1, so the
#    workers' 75 is lost. If we forwarded a signal and the launcher then exits
#    with anything but 0 (finished anyway) or 2 (bad config), we return 75.
_rp_child=
_rp_signal=
_rp_traps=0

_rp_forward() {
  _rp_traps=$((_rp_traps + 1))
  if [[ -n $_rp_signal ]]; then
    echo "[launch] SIG$1 again: already stopping, waiting for the checkpoint" >&2
    return 0
  fi
  _rp_signal=$1
  echo "[launch] SIG$1: asking the training processes to checkpoint and stop (exit 75)" >&2
  if [[ -n $_rp_child ]]; then
    kill -TERM "$_rp_child" 2>/dev/null || true
  fi
}

run_preemptible() {
  local rc seen
  if [[ ${DRY_RUN:-0} == 1 ]]; then # print the command instead of running it
    echo "[launch] would run: $(printf '%q ' "$@")" >&2
    return 0
  fi
  trap '_rp_forward TERM' TERM
  trap '_rp_forward INT' INT
  trap '_rp_forward USR1' USR1
  set -m
  "$@" &
  _rp_child=$!
  set +m
  # a signal that arrived before the launcher existed
  if [[ -n $_rp_signal ]]; then kill -TERM "$_rp_child" 2>/dev/null || true; fi
  while :; do
    seen=$_rp_traps
    rc=0
    wait "$_rp_child" || rc=$?
    # `wait` returns early (status > 128) when a trapped signal arrives: wait again
    if ((rc > 128 && _rp_traps != seen)); then continue; fi
    break
  done
  if [[ -n $_rp_signal ]] && ((rc != 0 && rc != 2 && rc != 75)); then
    echo "[launch] launcher exited with $rc after SIG$_rp_signal: reporting 75 (preempted, resumable)" >&2
    rc=75
  fi
  return "$rc"
}
