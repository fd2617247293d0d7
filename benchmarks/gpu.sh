#!/usr/bin/env bash
# The whole GPU session in one script (device time is scarce): correctness on CUDA, the pretraining loop's MFU,
# serving against transformers serve, lm-eval against its hf backend, PPO steps, and the whole recipe (micro sizes)
# on the GPU. Each part has its own time limit, so a slow part costs only itself; the most wanted parts come first.
# Everything printed goes to $OUT/gpu.log and the result files to $OUT/results.tgz (the device tool brings back at
# most 8 files); unpack them here with `tar xzf results.tgz benchmarks/results`, then `python -m benchmarks.report`.
# Packages the GPU image lacks travel as wheels in .whl: make them here with benchmarks/gpu_wheels.sh. The parts'
# limits sum to 810 s and their expected times to about 9 minutes: run it with timeout_s 570 (the last part, 0.5B
# training, is the one to lose).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
PY=${PY:-python3}
mkdir -p "$OUT" benchmarks/results
exec > >(tee "$OUT/gpu.log") 2>&1
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
nproc
collect() { tar czf "$OUT/results.tgz" benchmarks/results/gpu_*.json /tmp/gpu-run/report.md /tmp/gpu-run/metrics 2>/dev/null; }
part() {
  local limit=$1 name=$2
  shift 2
  echo "== $name (limit ${limit}s) $(date +%T)"
  SECONDS=0
  timeout "$limit" "$@"
  echo "== $name: exit $? after ${SECONDS}s"
  collect
}
part 60 check $PY -m benchmarks.gpu_check
part 180 train-1.8b $PY -m benchmarks.bench_train --device cuda --peak-tflops 989 --compile --steps 6 \
  --preset qwen-1.8b --seq 2048 --batch 4 --name gpu_train_1.8b
part 150 serve $PY -m benchmarks.bench_serve --device cuda --dtype bf16 --model tiny-40m --threads 4 --requests 2 \
  --servers qianwen,transformers-cb,transformers --name gpu_serve
part 120 eval $PY -m benchmarks.bench_eval --device cuda --dtype bfloat16 --compile --repeats 2 --name gpu_eval
part 60 ppo $PY -m benchmarks.bench_ppo --device cuda --rounds 1 --steps 6 --name gpu_ppo
MICRO=$($PY -c "import sys; sys.path.insert(0, 'tests'); from test_run import MICRO; print(' '.join(MICRO))")
part 90 run-micro $PY -m qianwen run --recipe tiny --out /tmp/gpu-run --seed 1 $MICRO
part 150 train-0.5b $PY -m benchmarks.bench_train --device cuda --peak-tflops 989 --compile --steps 6 \
  --preset qwen-1.8b --seq 2048 --batch 4 --model hidden_size=1024 intermediate_size=2816 --name gpu_train_0.5b
