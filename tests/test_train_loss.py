"""The fused output-projection loss against torch's own cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qianwen.train.loss import linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_and_gradients_match_cross_entropy(chunk, dtype):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 21, 16, generator=gen, dtype=dtype, requires_grad=True)
    weight = (torch.randn(50, 16, generator=gen, dtype=dtype) * 0.3).requires_grad_()
    targets = torch.randint(0, 50, (3, 21), generator=gen)
    targets[0, :5] = -100
    expected = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten())
    expected.backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    (got * 2).backward()  # an upstream gradient other than 1 must scale through
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.allclose(got, expected, atol=tol)
    assert torch.allclose(hidden.grad, 2 * want[0], atol=tol) and torch.allclose(weight.grad, 2 * want[1], atol=tol)


def test_frozen_weight_and_no_grad():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(30, 8)
    targets = torch.randint(0, 30, (10,))
    linear_cross_entropy(hidden, weight, targets).backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        value = linear_cross_entropy(hidden, weight, targets)
    assert torch.allclose(value, F.cross_entropy(hidden @ weight.T, targets))


def test_all_targets_ignored_gives_zero_not_nan():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(30, 8), torch.full((4,), -100))
    loss.backward()
    assert loss.item() == 0 and torch.all(hidden.grad == 0)


def test_mismatched_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match="5 hidden rows but 4 targets"):
        linear_cross_entropy(torch.randn(5, 8), torch.randn(30, 8), torch.zeros(4, dtype=torch.long))
