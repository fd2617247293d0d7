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
# The pretraining loop itself (shards, AdamW, clipping, logging) in bf16 with torch.compile: MFU at ~0.5B
# (Qwen1.5-0.5B's shape on the 1.8B preset) and at 1.8B, against a transformers loop on the same shapes.
TRAIN="$PY -m benchmarks.bench_train --device cuda --peak-tflops 989 --compile --steps 6"
timeout 240 $TRAIN --preset qwen-1.8b --seq 2048 --batch 4 --model hidden_size=1024 intermediate_size=2816 --name gpu_train_0.5b 2>&1 | grep -v "%|" | tee "$OUT/gpu_train_05b.txt"
timeout 300 $TRAIN --preset qwen-1.8b --seq 2048 --batch 4 --name gpu_train_1.8b 2>&1 | grep -v "%|" | tee "$OUT/gpu_train_18b.txt"
cp benchmarks/results/gpu_*.json "$OUT/" 2>/dev/null || true
# Serving: qianwen serve against transformers serve (default and continuous batching) on the GPU (tiny-40m shape).
timeout 240 $PY -m benchmarks.bench_serve --device cuda --model tiny-40m --threads 4 --requests 2 --name gpu_serve 2>&1 | tee "$OUT/gpu_serve.txt"
cp benchmarks/results/gpu_*.json "$OUT/" 2>/dev/null || true
