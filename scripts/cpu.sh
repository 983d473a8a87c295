#!/bin/sh
# `make bench`: the performance suite on CPU with its quick defaults (minutes per benchmark on 2 cores).
# Usage: scripts/cpu.sh [python] [out_dir]. THREADS=1 avoids OpenMP spin-waits on a shared machine.
set -eu
PY=${1:-python}
OUT=${2:-runs/bench/cpu}
THREADS=${THREADS:-1}
mkdir -p "$OUT"
for name in decode rollout-memory train-memory flops step-time; do
    echo "== $name"
    "$PY" -m pte.bench "$name" --threads "$THREADS" --json "$OUT/$name.json" --plot "$OUT/$name.png"
done
