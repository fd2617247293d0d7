"""The formulas of PPO-RLHF (QWEN_SPEC.md section 6), on [batch, response tokens] tensors with a mask that is
1 on response tokens and 0 on padding. Kept apart from the loop so each can be checked against its formula."""

from __future__ import annotations

from collections.abc import Callable

import torch


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over the unmasked entries; with `count`, the sum divided by it instead (a process's share of
    a batch spread over several, so that the processes' averaged gradients are those of the whole batch)."""
    return (x * mask).sum() / (mask.sum() if count is None else count).clamp(min=1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, total: Callable[[torch.Tensor], torch.Tensor] = identity
) -> torch.Tensor:
    """Zero mean, unit variance over the unmasked entries of the whole batch; padding stays 0. `total` sums a
    tensor over the processes that hold the rest of the batch."""
    sums = total(torch.stack([(x * mask).sum(), mask.sum()]))
    mean = sums[0] / sums[1].clamp(min=1)
    var = total(((x - mean) ** 2 * mask).sum()) / sums[1].clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities:
    k1 = log p - log q (unbiased, can be negative), k3 = (q/p - 1) - log(q/p) (unbiased, never negative)."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        log_ratio = ref_logp - logp
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl_estimator must be k1 or k3, got {kind!r}.")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by generalised advantage estimation over the response tokens; the value after
    the last token of a response is 0 (the episode ends there)."""
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        next_value = values[:, t] * m
    return advantages, (advantages + values) * mask


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate loss and the fraction of tokens where clipping was active (means as masked_mean's)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, count)
    return loss, masked_mean((clipped > unclipped).float(), mask, count)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.15,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Half the larger of the squared errors of the new values and of the values clipped near the old ones."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask, count)
