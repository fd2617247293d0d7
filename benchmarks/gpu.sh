#!/usr/bin/env bash
# The whole GPU session in one script (device time is scarce): environment,
# correctness checks, then eager and compiled benchmarks in bf16 at the
# Qwen-1.8B shape. Each part has its own time limit, so a slow part costs only
# itself; rows are printed as they come. Results land in $OUT.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
mkdir -p "$OUT" benchmarks/results
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/gpu_env.txt"
BENCH="$PY -m benchmarks.bench_model --device cuda --dtype bf16 --sizes qwen-1.8b --batch 4 --seq 2048 --steps 5 --new-tokens 256 --prefill 2048 --peak-tflops 989"
timeout 100 $PY -m benchmarks.gpu_check 2>&1 | tee "$OUT/gpu_check.txt"
timeout 180 $BENCH --only train decode prefill --name gpu_eager 2>&1 | grep -v Loading | tee "$OUT/gpu_eager.txt"
timeout 270 $BENCH --only decode_compiled train_compiled --name gpu_compiled 2>&1 | grep -v Loading | tee "$OUT/gpu_compiled.txt"
cp benchmarks/results/gpu_*.json "$OUT/" 2>/dev/null || true
