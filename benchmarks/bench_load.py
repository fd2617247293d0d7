"""Peak resident memory while loading a checkpoint, against its size on disk.

Each loader runs in a fresh process; the figure is the peak RSS (VmHWM) minus
the RSS just before loading, so imports do not count. Every weight is read once
after loading, so loaders that memory-map the file (and defer the reads) are
measured with the weights resident, as they are once the model runs.

    python -m benchmarks.bench_load [--size-mb 600]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import write_result
from qianwen.checkpoint import save_model
from qianwen.config import ModelConfig
from qianwen.model import Transformer

PROBE = """
import json, sys, time
import torch

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

kind, path = sys.argv[1], sys.argv[2]
if kind == "qianwen":
    from qianwen.checkpoint import load_model
    load = lambda: load_model(path)
elif kind == "transformers":
    from transformers import Qwen2ForCausalLM
    load = lambda: Qwen2ForCausalLM.from_pretrained(path)
else:
    from safetensors.torch import load_file
    from qianwen.checkpoint import read_config
    from transformers import Qwen2Config, Qwen2ForCausalLM
    def load():
        with torch.device("meta"):
            model = Qwen2ForCausalLM(Qwen2Config.from_pretrained(path))
        model.load_state_dict(load_file(path + "/model.safetensors"), assign=True)
        return model
before = rss("VmRSS")
start = time.perf_counter()
model = load()
# mmap-backed loaders defer the reads: touch every weight so all are resident.
with torch.no_grad():
    for p in model.parameters():
        p.sum()
seconds = time.perf_counter() - start
print(json.dumps({"peak_extra": rss("VmHWM") - before, "seconds": seconds}))
"""


def checkpoint(directory: Path, size_mb: int) -> int:
    hidden = 1024
    layers = max(1, round(size_mb * 2**20 / 4 / (12 * hidden * hidden)))
    config = ModelConfig(vocab_size=32000, hidden_size=hidden, num_layers=layers, num_heads=8, intermediate_size=2816)
    with torch.device("cpu"):
        model = Transformer(config)
    save_model(model, directory)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=600)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        size = checkpoint(Path(tmp), args.size_mb)
        for kind in ("qianwen", "transformers", "safetensors+assign"):
            out = subprocess.run([sys.executable, "-c", PROBE, kind, tmp], capture_output=True, text=True, check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "loader": kind,
                    "size_on_disk_mb": round(size / 2**20),
                    "peak_rss_extra_mb": round(result["peak_extra"] / 2**20),
                    "ratio_to_disk": round(result["peak_extra"] / size, 2),
                    "seconds": round(result["seconds"], 2),
                }
            )
    for row in rows:
        print(json.dumps(row))
    write_result("load_memory", rows, "python -m benchmarks.bench_load " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
