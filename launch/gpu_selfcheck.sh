#!/usr/bin/env bash
# GPU self-check: everything a machine with a GPU should prove, into ONE report file (Markdown).
#
#   bash launch/gpu_selfcheck.sh                      # report: runs/selfcheck/report-<host>-<UTC time>.md
#   REPORT=gpu.md DATA_ARGS="data.root=/data/mnist data.download=false" bash launch/gpu_selfcheck.sh
#
# Steps (each one's output goes into the report; a failing step does not stop the others):
#   1. `gan-ddp doctor`: versions, the build's GPU architectures, every GPU, precision, launch command
#   2. `pytest -m cuda`: the GPU test tier (tests/test_cuda.py)
#   3. `gan-ddp bench` for each shipped config in three variants: eager, `train.compile=true`, and the
#      launch-overhead lever `train.compile=true train.compile_mode=reduce-overhead` (CUDA graphs);
#      the eager one also times the textbook loop (--baseline). Then one table of all of them.
#
# Environment (all optional):
#   PYTHON     interpreter (default: .venv/bin/python if present, else python)
#   REPORT     report path
#   DATA_ARGS  overrides that say where MNIST is (default: none: the configs' data.root=data, downloaded
#              on first use, or the bundled test split without a network); e.g. "data.root=bundled data.split=test"
#   CONFIGS    configs to bench (default: configs/mnist_mlp.yaml configs/mnist_dcgan.yaml configs/mnist_quality.yaml)
#   VARIANTS   bench variants (default: eager compile graphs)
#   WARMUP, ITERS, REPEAT   bench windows (default 50, 300, 3)
#   DEADLINE_S  seconds from the start after which no further bench is started (default: none). Leases on
#              shared GPU machines are short: with it the report always ends with the summary table of the
#              benches that ran, and names the ones left out. (2026-12-04, one H200: doctor + tests took
#              ~4 min, each compiled bench ~1-2 min; the whole script needs ~12 min.)
#   ALLOW_CPU=1  run on a machine without a GPU anyway (to check the script itself; the `graphs` variant
#              is then left out, as CUDA graphs need a GPU). Without it, no GPU means exit 2 after doctor.
#
# Exit code: 0 when the doctor, the tests and every bench passed; 1 otherwise (the report says which);
# 2 when torch sees no GPU (and ALLOW_CPU is not set).
set -uo pipefail
# shellcheck source=SCRIPTDIR/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=$(pick_python)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
REPORT=${REPORT:-runs/selfcheck/report-$(hostname -s)-$stamp.md}
CONFIGS=${CONFIGS:-configs/mnist_mlp.yaml configs/mnist_dcgan.yaml configs/mnist_quality.yaml}
WARMUP=${WARMUP:-50}
ITERS=${ITERS:-300}
REPEAT=${REPEAT:-3}
VARIANTS=${VARIANTS:-eager compile graphs}
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [[ ${ALLOW_CPU:-} != 1 ]]; then
    "$PYTHON" -m gan_ddp doctor >&2
    echo "gpu_selfcheck.sh: torch sees no CUDA GPU here (doctor above says why); ALLOW_CPU=1 runs it anyway" >&2
    exit 2
  fi
  VARIANTS=${VARIANTS//graphs/}
fi
read -ra data_args <<<"${DATA_ARGS:-}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$(dirname "$REPORT")"
failed=()
skipped=()
SECONDS=0

section() { printf '\n## %s\n\n```\n' "$1" >>"$REPORT"; }
end_section() { printf '```\n' >>"$REPORT"; }

{
  echo "# gan-ddp GPU self-check"
  echo
  echo "- date (UTC): $(date -u '+%Y-%m-%d %H:%M')"
  echo "- host: $(hostname)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- python: $PYTHON"
  if command -v nvidia-smi >/dev/null; then
    echo "- nvidia-smi: $(nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | paste -sd ';')"
  fi
} >"$REPORT"

echo "[selfcheck] 1/3 doctor" >&2
section "gan-ddp doctor"
"$PYTHON" -m gan_ddp doctor >>"$REPORT" 2>&1 || failed+=("doctor")
end_section

echo "[selfcheck] 2/3 pytest -m cuda" >&2
section "pytest -m cuda"
"$PYTHON" -m pytest -m cuda -q -rs -p no:cacheprovider tests/test_cuda.py >>"$REPORT" 2>&1 || failed+=("pytest -m cuda")
end_section

echo "[selfcheck] 3/3 bench" >&2
section "gan-ddp bench (each run's table)"
for config in $CONFIGS; do
  name=$(basename "$config" .yaml)
  for variant in $VARIANTS; do
    case $variant in
      eager) extra=(train.compile=false) baseline=(--baseline) ;;
      compile) extra=(train.compile=true) baseline=() ;;
      graphs) extra=(train.compile=true train.compile_mode=reduce-overhead) baseline=() ;;
    esac
    if [[ -n ${DEADLINE_S:-} ]] && ((SECONDS >= DEADLINE_S)); then
      echo "### $name, $variant: not run (DEADLINE_S=$DEADLINE_S reached after ${SECONDS}s)" >>"$REPORT"
      skipped+=("bench $name $variant")
      continue
    fi
    echo "### $name, $variant" >>"$REPORT"
    echo "[selfcheck]   $name $variant" >&2
    "$PYTHON" -m gan_ddp bench --config "$config" "${data_args[@]}" "${extra[@]}" "${baseline[@]}" \
      --warmup "$WARMUP" --iters "$ITERS" --repeat "$REPEAT" --json "$work/$name.$variant.json" \
      >>"$REPORT" 2>&1 || failed+=("bench $name $variant")
  done
done
end_section

section "bench summary (images/s of the median window; speed-up against the textbook loop in the same process)"
"$PYTHON" - "$work" >>"$REPORT" 2>&1 <<'EOF'
import json, sys
from pathlib import Path

rows = sorted(Path(sys.argv[1]).glob("*.json"))
print(f"{'config':<16}{'variant':<9}{'precision':<10}{'img/s':>12}{'ms/iter':>9}{'textbook img/s':>16}{'speed-up':>10}")
eager = {}
for path in rows:
    name, variant = path.stem.split(".")
    f = json.loads(path.read_text())
    if variant == "eager":
        eager[name] = f
for path in rows:
    name, variant = path.stem.split(".")
    f = json.loads(path.read_text())
    base = eager.get(name, {}).get("baseline_img_per_s")
    speed = f"{f['img_per_s'] / base:.1f}x" if base else "-"
    print(
        f"{name:<16}{variant:<9}{f['precision']:<10}{f['img_per_s']:>12,.0f}{f['ms_per_iter']:>9.2f}"
        f"{(f'{base:,.0f}' if base else '-'):>16}{speed:>10}"
    )
print("goal on one H100: mnist_mlp >= 100,000 img/s at batch 100 and >= 20x the textbook loop")
EOF
end_section

if ((${#skipped[@]})); then
  printf '\n**Not run (deadline):** %s\n' "$(IFS=,; echo "${skipped[*]}")" >>"$REPORT"
fi
if ((${#failed[@]})); then
  printf '\n**Failed:** %s\n' "$(IFS=,; echo "${failed[*]}")" >>"$REPORT"
  echo "[selfcheck] report: $REPORT (failed: ${failed[*]})" >&2
  exit 1
fi
if ((${#skipped[@]})); then
  printf '\n**All steps that ran passed.**\n' >>"$REPORT"
else
  printf '\n**All steps passed.**\n' >>"$REPORT"
fi
echo "[selfcheck] report: $REPORT" >&2
