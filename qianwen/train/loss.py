"""Next-token losses: the transformer with its loss as one module (CausalLM), and a cross-entropy fused with
the output projection for large vocabularies.

The logits of a Qwen vocabulary are the largest tensor of a training step
(151,936 floats per token: 5 GB for a batch of 8,192 tokens in fp32). Here
they exist one chunk of rows at a time: each chunk's loss and its gradients
with respect to the hidden states and the output matrix are computed at once,
in the forward pass, so neither the full logits nor their softmax is stored.
The matmuls are the same three as the plain loss (logits, grad of the hidden
states, grad of the weight); what goes is the traffic of the full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # label of positions that are not trained (prompt tokens, padding)
FUSED_LOSS_VOCAB = 32768  # from here up the fused loss saves memory at no cost in speed (benchmarks/bench_loss.py)
EVAL_CHUNK = 512  # positions per logits chunk when evaluating


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index: int, chunk: int):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # bf16 accumulates in fp32
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if weight.requires_grad else None
        total = hidden.new_zeros((), dtype=acc)
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start : start + chunk]
            t = targets[start : start + chunk].clamp(min=0)
            keep = valid[start : start + chunk]
            logits = (h @ weight.T).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, t[:, None]).squeeze(1)) * keep).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(sum of losses)/d(logits) = softmax - one_hot, zero on ignored rows
            probs = logits.sub_(lse[:, None]).exp_()
            probs[torch.arange(len(t), device=t.device), t] -= 1
            grad_logits = probs.mul_(keep[:, None])
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = grad_logits.to(hidden.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, h.to(acc))
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output / count
        gh = grad_hidden * scale.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def default_chunk(vocab_size: int, device: torch.device) -> int:
    """Rows per chunk. On a CPU, about 1 MiB of fp32 logits (they stay in
    cache) but never under 128 rows: each chunk also adds a rank-`rows` update
    to the whole weight gradient, and with fewer rows that traffic dominates
    (16-row chunks at the Qwen vocabulary ran 2.4x slower). On a GPU, about
    1 GiB of logits: large matmuls, bounded memory."""
    budget = 2**28 if device.type == "cuda" else 2**18
    return max(128, min(budget // vocab_size, 65536))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    chunk: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T` against `targets`, skipping
    `ignore_index`; hidden [..., d], weight [vocab, d], targets [...]. Equal to
    `F.cross_entropy(hidden @ weight.T, targets)` in value and gradients."""
    hidden2d, targets1d = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if hidden2d.shape[0] != targets1d.shape[0]:
        raise ValueError(f"{hidden2d.shape[0]} hidden rows but {targets1d.shape[0]} targets.")
    chunk = chunk or default_chunk(weight.shape[0], hidden.device)
    return _LinearCrossEntropy.apply(hidden2d, weight, targets1d, ignore_index, chunk)


class CausalLM(nn.Module):
    """The transformer plus the next-token loss, as one module so FSDP2 gathers the output head for it."""

    def __init__(self, model: nn.Module, loss: str = "auto"):
        super().__init__()
        if loss not in ("auto", "fused", "plain"):
            raise ValueError(f"loss must be auto, fused or plain, got {loss!r}.")
        self.model = model
        self.fused = loss == "fused" or (loss == "auto" and model.config.vocab_size >= FUSED_LOSS_VOCAB)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None, per_token: bool = False):
        """The mean next-token loss of tokens [B, T+1] (targets: `labels` where given, -100 = not trained);
        with per_token, the losses [B, T] in fp32, the logits made a chunk of positions at a time (evaluation:
        a 151k vocabulary never costs a full [B, T, V]). Both go through forward, where FSDP2 gathers the
        embedding and the output head."""
        hidden = self.model.hidden_states(tokens[:, :-1])
        targets = (tokens if labels is None else labels)[:, 1:]
        if per_token:
            out = []
            for start in range(0, hidden.shape[1], EVAL_CHUNK):
                logits = self.model.lm_head(hidden[:, start : start + EVAL_CHUNK]).float()
                chunk = targets[:, start : start + EVAL_CHUNK]
                out.append(F.cross_entropy(logits.transpose(1, 2), chunk, reduction="none", ignore_index=IGNORE))
            return torch.cat(out, dim=1)
        if self.fused:
            return linear_cross_entropy(hidden, self.model.lm_head.weight, targets, ignore_index=IGNORE)
        logits = self.model.lm_head(hidden)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
