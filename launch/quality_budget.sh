#!/usr/bin/env bash
# Sample quality per unit of time: docs/quality.md's "FID over time" table, reproducible on your machine.
#
# Trains each shipped config for the same wall-clock budget, one run at a time (runs must not share the
# CPU), keeping every checkpoint; trains the tutorials' textbook loop (`gan-ddp textbook`) for the same
# budget; then scores every checkpoint / sample file with the CNN evaluator and the independent MLP one,
# and prints one markdown table per evaluator.
#
#   launch/quality_budget.sh [OUT_DIR] [SECONDS] [key=value ...]    # overrides go to every run
#   environment: N_SAMPLES (per score, default 10000), POINTS (textbook snapshots, default 10),
#   GAN_DDP (the gan-ddp executable), PYTHON, CONFIGS (which runs, default all: "mnist_mlp mnist_dcgan
#   mnist_quality mnist_conditional textbook"; e.g. CONFIGS=mnist_quality to check the recommended one alone)
#   e.g. launch/quality_budget.sh runs/quality600 600 data.root=bundled data.split=test
#
# Runs that finished their budget are kept (a BUDGET_DONE file) and only scored again when re-run;
# an interrupted one is started afresh, since a budget split over two sessions would not compare.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/quality_budget}
SECONDS_BUDGET=${2:-600}
shift $(( $# > 2 ? 2 : $# ))
OVERRIDES=("$@")
GAN=${GAN_DDP:-.venv/bin/gan-ddp}
PY=${PYTHON:-.venv/bin/python}
N=${N_SAMPLES:-10000}   # samples per score
POINTS=${POINTS:-10}    # textbook-loop snapshots over the budget
read -r -a RUNS <<<"${CONFIGS:-mnist_mlp mnist_dcgan mnist_quality mnist_conditional textbook}"
for name in "${RUNS[@]}"; do
    case $name in
        mnist_mlp | mnist_dcgan | mnist_quality | mnist_conditional | textbook) ;;
        *) echo "error: CONFIGS: unknown run '$name' (mnist_mlp mnist_dcgan mnist_quality mnist_conditional textbook)" >&2; exit 2 ;;
    esac
done
wanted() { [[ " ${RUNS[*]} " == *" $1 "* ]]; }
# The real data every score uses is the first gan-ddp run's (the textbook loop has no config.yaml).
first=$(for name in "${RUNS[@]}"; do [ "$name" != textbook ] && echo "$name"; done | head -n 1 || true)
[ -n "$first" ] || { echo "error: CONFIGS: the textbook loop is scored against the data of a gan-ddp run; add one (e.g. mnist_mlp)" >&2; exit 2; }
EVERY=$(( SECONDS_BUDGET / POINTS > 0 ? SECONDS_BUDGET / POINTS : 1 ))
mkdir -p "$OUT"

# A result is only comparable with others from the same kind of CPU: say which one made it, with the
# flags that change the speed of this trainer (AVX2/AVX-512 matmuls; native bf16 makes precision=auto bf16).
cpu_model=$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)
cpu_flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | grep -xE 'avx2|avx512f|avx512_bf16|amx_bf16|amx_tile' | paste -sd ' ' || true)
echo "machine: ${cpu_model:-unknown CPU}, $(nproc) cores, flags: ${cpu_flags:-none of avx2/avx512f/avx512_bf16/amx}; budget ${SECONDS_BUDGET} s per run"

train() {  # name config checkpoint.every
    # A finished run is not trained again: max_seconds is per session, a resume would add a second budget.
    wanted "$1" || return 0
    [ -f "$OUT/$1/BUDGET_DONE" ] && return 0
    rm -rf "${OUT:?}/$1"
    # epochs very large: the time budget, not the config's epoch count, ends every run; no evaluation
    # during training (it would spend the budget): the checkpoints are scored afterwards.
    "$GAN" train --config "$2" train.max_seconds="$SECONDS_BUDGET" train.epochs=1000000 \
        checkpoint.every="$3" checkpoint.keep=1000 eval.every=null log.wandb=disabled run.dir="$OUT/$1" "${OVERRIDES[@]}"
    touch "$OUT/$1/BUDGET_DONE"
}
train mnist_mlp configs/mnist_mlp.yaml 2000
train mnist_dcgan configs/mnist_dcgan.yaml 250
train mnist_quality configs/mnist_quality.yaml 1000
train mnist_conditional configs/mnist_conditional.yaml 1000
if wanted textbook && [ ! -f "$OUT/textbook/BUDGET_DONE" ]; then
    rm -rf "${OUT:?}/textbook"
    "$GAN" textbook --config configs/mnist_mlp.yaml --seconds "$SECONDS_BUDGET" --every "$EVERY" --n "$N" \
        --out "$OUT/textbook" "${OVERRIDES[@]}"
    touch "$OUT/textbook/BUDGET_DONE"
fi

# The textbook samples are scored against the real data the runs used.
data=$("$PY" -c 'import sys; from omegaconf import OmegaConf as O; d = O.load(sys.argv[1]).data; print(d.dataset, d.root, d.split)' \
    "$OUT/$first/config.yaml")
read -r dataset root split <<<"$data"
# Every score is one `gan-ddp eval` command line; they run one after another in a single Python process
# (`gan_ddp.commands.cli.main`, what the console script calls), since starting the interpreter and torch
# for each cost more than the scoring itself at small N (12 processes of ~4 s each at N=400).
"$PY" - "$OUT" "$N" "$dataset" "$root" "$split" "${RUNS[@]}" <<'EOF'
import sys
from pathlib import Path
from gan_ddp.commands.cli import main
out, n, dataset, root, split, runs = Path(sys.argv[1]), *sys.argv[2:6], sys.argv[6:]
for evaluator in ("cnn", "mlp"):
    jobs = [
        ["--run", out / name, "--all-checkpoints", "--n", n, "--json", out / f"{name}.{evaluator}.json"]
        for name in ("mnist_mlp", "mnist_dcgan", "mnist_quality", "mnist_conditional") if name in runs
    ]
    if "textbook" in runs:  # scored against the real data the runs used
        jobs += [
            ["--samples", npz, "--dataset", dataset, "--root", root, "--split", split, "--json", npz.with_suffix(f".{evaluator}.json")]
            for npz in sorted((out / "textbook").glob("t*.npz"))
        ]
    for job in jobs:
        code = main(["eval", *map(str, job), "--evaluator", evaluator])
        if code:
            sys.exit(code)  # the command printed its one error line
EOF
"$PY" - "$OUT" "$SECONDS_BUDGET" "${RUNS[@]}" <<'EOF'
import json, sys
out, budget, runs = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
for evaluator in ("cnn", "mlp"):
    curves = {}
    finals = {}
    for name in [r for r in ("mnist_mlp", "mnist_dcgan", "mnist_quality", "mnist_conditional") if r in runs]:
        rows = json.load(open(f"{out}/{name}.{evaluator}.json"))["rows"]
        curves[name] = [(r["time_s"], r["eval/fid"], r["eval/coverage"]) for r in rows]
        finals[name] = rows[-1]
    if "textbook" in runs:
        tb = []
        for line in map(json.loads, open(f"{out}/textbook/log.jsonl")):
            m = json.load(open(f"{out}/textbook/{line['samples'][:-4]}.{evaluator}.json"))
            tb.append((line["time_s"], m["eval/fid"], m["eval/coverage"]))
        curves["textbook loop"] = tb
    print(f"\n{evaluator} evaluator: FID (classes covered) at training time t")
    marks = [budget / 10, budget / 5, budget / 2, budget]
    print("| config | " + " | ".join(f"t ≤ {m:.0f} s" for m in marks) + " |")
    print("|---|" + "---|" * len(marks))
    for name, points in curves.items():
        cells = []
        for m in marks:
            # The budget column is each run's last point: the budget stopped the run, within one step of it
            # (a step, or the set-up on a loaded machine, can end past it). Earlier columns: the newest point
            # at that time.
            before = points if m == budget else [p for p in points if p[0] is not None and p[0] <= m + 1]
            cells.append(f"{before[-1][1]:.1f} ({before[-1][2]})" if before else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    # The newest checkpoint of each run, every metric: KID as mean +- std over subsets (the evaluator's
    # feature scale: real vs real ~0, noise ~260, docs/quality.md);
    # agreement (the evaluator's class = the requested one) only for class-conditional generators.
    print(f"\n{evaluator} evaluator: every metric at the budget")
    print("| config | steps | FID | KID | precision | recall | classes | agreement (worst class) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in finals.items():
        agreement = f"{r['eval/agreement']:.1%} ({r['eval/agreement_min']:.1%})" if "eval/agreement" in r else "-"
        print(
            f"| {name} | {r['step']:,} | {r['eval/fid']:.1f} | {r['eval/kid']:.2f} ± {r['eval/kid_std']:.2f}"
            f" | {r['eval/precision']:.3f} | {r['eval/recall']:.3f} | {r['eval/coverage']} | {agreement} |"
        )
EOF
