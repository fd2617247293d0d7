"""Muon with the Newton-Schulz iterations of same-shaped matrices run as one batched product.

torch.optim.Muon orthogonalises one matrix at a time. A transformer has a handful of shapes, each repeated once
per layer, and at the tiny recipe's widths (256 x 704 at most) a lone bf16 product is too small to keep the
CPU's matrix units busy: stacking the six layers' matrices of a shape takes the iterations from 55 to 31 ms a
step, the whole pretraining step about 10% (benchmarks/bench_muon.py). The update is torch.optim.Muon's: to
the bit at the tiny presets (tests/test_train_loop.py), within a bf16 rounding where a batched product sums in
another order (tiny-40m's 1024 x 512 matrices, now and then); the state and its checkpoints are the same.
Sharded parameters (FSDP2's DTensors) and a non-default learning-rate adjustment go through torch's own step.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


def orthogonalise(
    updates: torch.Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
):
    """The quintic Newton-Schulz iteration of torch.optim.Muon on a stack [n, rows, cols] of matrices, in bf16 as
    torch's (or `dtype`): each scaled to unit Frobenius norm, then iterated on its wide orientation (the smaller
    Gram matrix)."""
    a, b, c = coefficients
    x = updates.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class StackedMuon(torch.optim.Muon):
    def __init__(self, params, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype  # fp32 on a CPU without bf16 units, where bf16 products are emulated

    @torch.no_grad()
    def step(self, closure=None):
        groups = self.param_groups
        if any(g["adjust_lr_fn"] not in (None, "original") for g in groups) or any(
            hasattr(p, "full_tensor") for g in groups for p in g["params"]
        ):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            if not params:
                continue
            momentum = group["momentum"]
            for buffer, grad in zip(buffers, grads):
                buffer.lerp_(grad, 1 - momentum)
            updates = [g.lerp(m, momentum) for g, m in zip(grads, buffers)] if group["nesterov"] else buffers
            by_shape = defaultdict(list)
            for i, p in enumerate(params):
                by_shape[(p.shape, p.device)].append(i)
            lr, decay = group["lr"], group["weight_decay"]
            for (shape, _), index in by_shape.items():
                ortho = orthogonalise(
                    torch.stack([updates[i] for i in index]),
                    group["ns_coefficients"],
                    group["ns_steps"],
                    group["eps"],
                    self.ns_dtype,
                )
                scaled_lr = lr * math.sqrt(max(1, shape[0] / shape[1]))  # torch's "original" adjustment
                for i, o in zip(index, ortho):
                    params[i].mul_(1 - lr * decay)
                    params[i].add_(o, alpha=-scaled_lr)
        return loss
