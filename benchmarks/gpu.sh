#!/usr/bin/env bash
# The whole GPU session in one script (device time is scarce): environment,
# correctness checks, then the training/decode/prefill benchmarks in bf16 with
# and without torch.compile. Results land in $OUT (or benchmarks/results).
set -uo pipefail
OUT=${OUT:-benchmarks/results}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
mkdir -p "$OUT" benchmarks/results
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } 2>&1 | tee "$OUT/gpu_env.txt"
timeout 150 $PY -m benchmarks.gpu_check 2>&1 | tee "$OUT/gpu_check.txt"
timeout 420 $PY -m benchmarks.bench_model --device cuda --dtype bf16 --sizes qwen-1.8b --batch 4 --seq 2048 \
    --steps 5 --new-tokens 256 --prefill 2048 --compile --peak-tflops 989 --name model_h100 2>&1 | tee "$OUT/bench_gpu.txt"
cp benchmarks/results/model_h100.json "$OUT/" 2>/dev/null || true
