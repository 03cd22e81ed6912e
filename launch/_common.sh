# shellcheck shell=bash
# Helpers sourced by launch/cpu_multiproc.sh and launch/gpu_local.sh (not run directly).

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

# run_preemptible CMD [ARGS...]
#
# Runs CMD (a launcher: torchrun or accelerate, or the trainer itself) and
# returns its exit code, with two fixes for preemption:
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
