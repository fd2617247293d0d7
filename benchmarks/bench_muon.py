"""StackedMuon (qianwen/train/muon.py: same-shaped matrices orthogonalised as one batched product) against
torch.optim.Muon (one matrix at a time) on the layers' matrices of a preset, with the same gradients: the
optimizer step's time, and how far apart the two leave the parameters (the largest difference over the largest
change: 0 is bitwise equal, a bf16 rounding of the update is about 0.004).

    python -m benchmarks.bench_muon [--presets tiny-10m tiny-40m]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from benchmarks.common import best_time, write_result
from qianwen.config import preset
from qianwen.model import Transformer
from qianwen.train.muon import StackedMuon


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="+", default=["tiny-10m", "tiny-40m"])
    args = parser.parse_args()
    rows = []
    for name in args.presets:
        torch.manual_seed(0)
        model = Transformer(preset(name))
        matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "layers." in n]
        grads = [torch.randn_like(p) for p in matrices]
        sides = {}
        for label, cls in (("stacked", StackedMuon), ("torch", torch.optim.Muon)):
            params = [p.detach().clone().requires_grad_() for p in matrices]
            for p, g in zip(params, grads):
                p.grad = g
            sides[label] = (params, cls(params, lr=0.01, weight_decay=0.1))
        times = {label: [] for label in sides}
        for _ in range(5):  # alternate, so drift in machine load hits both alike
            for label, (_, opt) in sides.items():
                times[label].append(best_time(opt.step, repeats=3))
        ours, theirs = statistics.median(times["stacked"]), statistics.median(times["torch"])
        change = max((a.detach() - p).abs().max().item() for a, p in zip(sides["torch"][0], matrices))
        apart = max((a - b).abs().max().item() for a, b in zip(sides["stacked"][0], sides["torch"][0]))
        row = {
            "preset": name,
            "matrices": len(matrices),
            "shapes": len({tuple(p.shape) for p in matrices}),
            "stacked_ms": round(ours * 1000, 1),
            "torch_ms": round(theirs * 1000, 1),
            "speed_ratio": round(theirs / ours, 2),
            "difference_over_change": round(apart / change, 4),
        }
        print(json.dumps(row))
        rows.append(row)
    write_result("muon", rows, "python -m benchmarks.bench_muon " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
