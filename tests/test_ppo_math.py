"""PPO's formulas against plain numpy loops and hand-made batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qianwen.train.ppo_math import gae, kl_estimate, masked_whiten, policy_loss, value_loss


def numpy_gae(rewards, values, lengths, gamma, lam):
    """One response at a time, written the textbook way: delta_t = r_t + gamma V_{t+1} - V_t, V after the end 0."""
    adv = np.zeros_like(rewards)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    returns = adv + values * (np.arange(rewards.shape[1])[None] < np.array(lengths)[:, None])
    return adv, returns


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9)])
def test_gae_matches_numpy_with_padding(seed, gamma, lam):
    rng = np.random.default_rng(seed)
    B, T = 5, 9
    lengths = rng.integers(1, T + 1, B)
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.float64)
    rewards = rng.normal(size=(B, T)) * mask
    values = rng.normal(size=(B, T)) * mask
    want_adv, want_ret = numpy_gae(rewards, values, lengths, gamma, lam)
    adv, ret = gae(torch.tensor(rewards), torch.tensor(values), torch.tensor(mask), gamma, lam)
    np.testing.assert_allclose(adv.numpy(), want_adv, atol=1e-12)
    np.testing.assert_allclose(ret.numpy(), want_ret, atol=1e-12)


def test_whitening_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -7.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    real = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    want = (real - real.mean()) / math.sqrt(real.var() + 1e-8)
    got = masked_whiten(x, mask)
    np.testing.assert_allclose(got[mask.bool()].numpy(), want, rtol=1e-6)
    assert (got[~mask.bool()] == 0).all()


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    np.testing.assert_allclose(kl_estimate(logp, ref, "k1").numpy(), [0.5, -1.0, 0.0])
    r = (ref - logp).numpy()
    np.testing.assert_allclose(kl_estimate(logp, ref, "k3").numpy(), np.exp(r) - 1 - r, rtol=1e-6)
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1 or k3"):
        kl_estimate(logp, ref, "k2")


def test_clipped_losses_on_a_hand_made_batch():
    old = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.75, 0.5, 0.25]]))  # ratios 1.5, 1.0, 0.5
    adv = torch.tensor([[1.0, -2.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    loss, clipfrac = policy_loss(new, old, adv, mask, clip=0.2)
    # token 1: min(1.5, 1.2) * 1 -> -1.2 (clipped); token 2: -(-2 * 1) = 2; token 3: max(0.5, 0.8) * -1 -> 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 + 2.0 + 0.8) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)

    values = torch.tensor([[1.0, 0.0, 2.0, 9.0]])
    old_values = torch.tensor([[0.5, 0.0, 2.5, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    vmask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # clipped values: 0.65, 0.0, 2.35 ; errors max((1)^2,(0.65)^2)=1, max(1,1)=1, max(1, 0.4225)=1
    assert value_loss(values, old_values, returns, vmask, clip=0.15).item() == pytest.approx(0.5 * (1 + 1 + 1) / 3)
    values2 = torch.tensor([[0.6, 0.0, 2.9, 0.0]])
    # clipped: 0.6, 0.0, 2.65 -> errors max(.36,.36)=.36, 1, max(.01, .1225)=.1225
    assert value_loss(values2, old_values, returns, vmask, clip=0.15).item() == pytest.approx(
        0.5 * (0.36 + 1 + 0.1225) / 3
    )


def test_a_batch_split_over_processes_gives_the_whole_batch_means():
    """Each process's half divides by half the batch's tokens (`count`), and whitening sums its statistics over
    both halves (`total`): the halves' averaged losses and the whitened halves equal the whole batch's."""
    gen = torch.Generator().manual_seed(0)
    B, T = 6, 7
    mask = (torch.arange(T)[None] < torch.tensor([7, 2, 5, 1, 6, 3])[:, None]).float()  # uneven tokens per half
    logp, old, adv, values, old_values, returns = (torch.randn(B, T, generator=gen) * mask for _ in range(6))
    halves = [slice(0, 3), slice(3, 6)]
    count = mask.sum() / 2
    split = [policy_loss(logp[h], old[h], adv[h], mask[h], 0.2, count)[0] for h in halves]
    assert (split[0] + split[1]).item() / 2 == pytest.approx(policy_loss(logp, old, adv, mask)[0].item(), rel=1e-6)
    split = [value_loss(values[h], old_values[h], returns[h], mask[h], 0.15, count) for h in halves]
    whole = value_loss(values, old_values, returns, mask)
    assert (split[0] + split[1]).item() / 2 == pytest.approx(whole.item(), rel=1e-6)

    mean = (adv * mask).sum() / mask.sum()
    for h, other in (halves, halves[::-1]):
        # An all-reduce seen from process h: its own sums plus the other's (first the sum and the count, then
        # the squared deviations).
        theirs = iter(
            [torch.stack([adv[other].sum(), mask[other].sum()]), ((adv[other] - mean) ** 2 * mask[other]).sum()]
        )
        got = masked_whiten(adv[h], mask[h], total=lambda t, theirs=theirs: t + next(theirs))
        torch.testing.assert_close(got, masked_whiten(adv, mask)[h])
