#!/bin/sh
# `make bench-gpu`: the whole suite on one CUDA GPU in under 8 minutes (bf16, CUDA max-allocated memory).
# Each benchmark runs under its own time limit and writes its JSON as it goes, so a slow section loses only
# its last settings, never the rest. Usage: scripts/gpu.sh [python] [out_dir]
set -u
PY=${1:-python}
OUT=${2:-runs/bench/gpu}
mkdir -p "$OUT"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'bench-gpu needs a CUDA device'" || exit 1
run() {  # run SECONDS NAME JSON ARGS...
    limit=$1; name=$2; json=$3; shift 3
    echo "== $name ($json, at most ${limit}s)"
    timeout "$limit" "$PY" -m pte.bench "$name" --json "$OUT/$json.json" --plot "$OUT/$json.png" "$@" || echo "   $name stopped (rc $?)"
}
start=$(date +%s)
run 140 decode decode --model mid-llama --dtype bfloat16 --batch 8 --lengths 512 2048 8192 --repeats 1 --warmup 64 \
    --methods generate window pte linears-only
run 50 decode decode_static --model mid-llama --dtype bfloat16 --batch 8 --lengths 2048 --repeats 1 \
    --methods generate generate-static window
run 80 rollout-memory rollout_memory --model mid-llama --dtype bfloat16 --batch 4 --lengths 1024 16384
run 70 rollout-throughput rollout_throughput --model mid-llama --dtype bfloat16 --rows 64 --micro-batch 16 --group 8 \
    --tokens 1024 --window 256 --prompt-len 256
run 60 train-memory train_memory --model mid-llama --dtype bfloat16 --lengths 512 1024 2048 4096
run 20 flops flops --model tiny-llama --lengths 1024 4096
run 60 step-time step_time --model tiny-llama rollout.batch_size=8 rollout.group_size=4 \
    rollout.max_new_tokens=256 cache.window=64 model.dtype=bfloat16
echo "suite took $(( $(date +%s) - start ))s; results in $OUT"
