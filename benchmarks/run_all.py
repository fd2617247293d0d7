"""`make bench`: every CPU benchmark, then BENCHMARKS.md rebuilt from the
results (GPU results come from benchmarks/gpu.sh on a GPU machine)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# The evaluation benchmark also scores the tiny recipe's trained base model when `make run` has made one.
TRAINED = Path("runs/tiny/base")

RUNS = [
    ["benchmarks.bench_tokenizer"],
    ["benchmarks.bench_bpe"],
    ["benchmarks.bench_sandbox"],
    ["benchmarks.bench_data"],
    ["benchmarks.bench_load", "--size-mb", "1000"],
    ["benchmarks.bench_train"],
    ["benchmarks.bench_train", "--compile", "--name", "train_compiled"],
    ["benchmarks.bench_muon"],
    ["benchmarks.bench_rm"],
    ["benchmarks.bench_model", "--only", "train", "decode", "prefill", "decode_compiled"],
    [
        "benchmarks.bench_model",
        "--sizes",
        "tiny-1m",
        "--only",
        "decode",
        "decode_compiled",
        "prefill",
        "--name",
        "model_tiny1m",
    ],
    ["benchmarks.bench_eval", *(["--checkpoint", str(TRAINED)] if (TRAINED / "config.json").is_file() else [])],
    ["benchmarks.bench_serve"],
]


def main() -> None:
    for args in RUNS:
        print("$ python -m", " ".join(args), flush=True)
        subprocess.run([sys.executable, "-m", *args], check=True)
    subprocess.run([sys.executable, "-m", "benchmarks.report"], check=True)


if __name__ == "__main__":
    main()
