"""The fused output-projection loss (qianwen/train/loss.py) against
`F.cross_entropy(hidden @ weight.T)`: forward + backward time, and the largest
temporary each one holds (the full logits, or one chunk of them).

    python -m benchmarks.bench_loss
"""

from __future__ import annotations

import json
import statistics
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import best_time, write_result
from qianwen.train.loss import default_chunk, linear_cross_entropy

CASES = [  # (name, rows = batch x sequence, hidden, vocabulary)
    ("tiny-10m shape", 2048, 256, 8192),
    ("Qwen vocabulary", 1024, 1024, 151936),
]


def main() -> None:
    rows = []
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for name, n, d, v in CASES:
        gen = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(n, d, device=device, generator=gen, requires_grad=True)
        weight = (torch.randn(v, d, device=device, generator=gen) * 0.02).requires_grad_()
        targets = torch.randint(0, v, (n,), device=device, generator=gen)

        def plain(hidden=hidden, weight=weight, targets=targets):
            F.cross_entropy(hidden @ weight.T, targets).backward()

        def fused(hidden=hidden, weight=weight, targets=targets):
            linear_cross_entropy(hidden, weight, targets).backward()

        times = {"plain": [], "fused": []}
        for _ in range(5):  # alternate, so drift in machine load hits both alike
            times["plain"].append(best_time(plain, repeats=1))
            times["fused"].append(best_time(fused, repeats=1))
        a, b = statistics.median(times["fused"]), statistics.median(times["plain"])
        chunk = min(default_chunk(v, device), n)
        row = {
            "case": name,
            "rows": n,
            "hidden": d,
            "vocab": v,
            "fused_ms": round(a * 1000, 1),
            "plain_ms": round(b * 1000, 1),
            "speed_ratio": round(b / a, 2),
            "largest_logits_mb_fused": round(chunk * v * 4 / 2**20, 1),
            "largest_logits_mb_plain": round(n * v * 4 / 2**20, 1),
        }
        print(json.dumps(row))
        rows.append(row)
    write_result("loss", rows, "python -m benchmarks.bench_loss " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
