"""Masked reductions and loss aggregation against numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from rlinf.algorithms import aggregate_loss, masked_mean, masked_sum, masked_var, masked_whiten

NAN = float("nan")


def close(actual: torch.Tensor, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


# --- masked reductions -------------------------------------------------------------------------------


def test_masked_mean_and_sum_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, NAN], [float("inf"), 5.0]])
    m = torch.tensor([[1, 1], [1, 0], [0, 0]])
    close(masked_sum(x, m), 6.0)  # 1 + 2 + 3; the nan and inf are masked
    close(masked_mean(x, m), 2.0)  # 6 / 3
    close(masked_mean(x, m, dim=1), [1.5, 3.0, 0.0])  # the empty row gives 0, not nan
    close(masked_sum(x, m, dim=0), [4.0, 2.0])


def test_masked_mean_gradient_is_finite_on_padding():
    x = torch.tensor([1.0, float("-inf"), 3.0], requires_grad=True)
    masked_mean(x, torch.tensor([True, False, True])).backward()
    close(x.grad, [0.5, 0.0, 0.5])
    y = torch.ones(3, requires_grad=True)
    masked_mean(y, torch.zeros(3)).backward()  # nothing valid: 0 and a zero gradient
    close(y.grad, [0.0, 0.0, 0.0])


def test_masked_var_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    m = torch.tensor([1, 1, 1, 1, 0])
    # mean 2.5, squared deviations 2.25 + .25 + .25 + 2.25 = 5: population 5/4, Bessel 5/3
    close(masked_var(x, m), 1.25)
    close(masked_var(x, m, unbiased=True), 5 / 3)
    close(masked_var(x, torch.tensor([1, 0, 0, 0, 0]), unbiased=True), 0.0)


def test_masked_whiten_by_hand():
    x = torch.tensor([2.0, 6.0, NAN])
    m = torch.tensor([True, True, False])
    # mean 4, population std 2 -> [-1, 1]; the masked element becomes 0
    close(masked_whiten(x, m), [-1.0, 1.0, 0.0])
    # shift_mean=False keeps the mean: [-1 + 4, 1 + 4]
    close(masked_whiten(x, m, shift_mean=False), [3.0, 5.0, 0.0])
    # a constant input gives zeros, not nan
    close(masked_whiten(torch.full((3,), 7.0), torch.ones(3)), [0.0, 0.0, 0.0], atol=0)


def test_masked_rejects_mismatched_mask():
    with pytest.raises(ValueError, match=r"mask has shape \(3,\) but values has shape \(2,\)"):
        masked_mean(torch.zeros(2), torch.ones(3))


# --- aggregation -------------------------------------------------------------------------------------

LOSSES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])  # the last row is padding


def test_aggregation_modes_by_hand():
    # token-mean: (1 + 2 + 3 + 4) / 4 = 2.5
    close(aggregate_loss(LOSSES, MASK, mode="token-mean"), 2.5)
    # seq-mean-token-mean: row means 2 and 4 (the padded row does not count) -> 3
    close(aggregate_loss(LOSSES, MASK, mode="seq-mean-token-mean"), 3.0)
    # seq-mean-token-sum: row sums 6 and 4 -> 5
    close(aggregate_loss(LOSSES, MASK, mode="seq-mean-token-sum"), 5.0)
    # with Dr. GRPO's constant normaliser 3: (6/3 + 4/3) / 2 = 5/3
    close(aggregate_loss(LOSSES, MASK, mode="seq-mean-token-sum", length_normaliser=3.0), 5 / 3)


def test_aggregation_token_weights_via_gradient():
    x = LOSSES.clone().requires_grad_(True)
    aggregate_loss(x, MASK, mode="seq-mean-token-mean").backward()
    # each of the 2 sequences weighs 1/2, split over its tokens: row 0 -> 1/6 each, row 1 -> 1/2
    close(x.grad, [[1 / 6, 1 / 6, 1 / 6], [0.5, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_aggregation_fully_masked_batch_gives_zero(mode):
    x = torch.full((2, 3), NAN, requires_grad=True)
    loss = aggregate_loss(x, torch.zeros(2, 3), mode=mode)
    loss.backward()
    assert loss.item() == 0.0
    close(x.grad, [[0.0] * 3] * 2, atol=0)


def test_aggregation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="Did you mean 'seq-mean-token-sum'"):
        aggregate_loss(LOSSES, MASK, mode="seq-mean-token_sum")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"length_normaliser=3\.0 only applies"):
        aggregate_loss(LOSSES, MASK, mode="seq-mean-token-mean", length_normaliser=3.0)
    with pytest.raises(ValueError, match="length_normaliser=0"):
        aggregate_loss(LOSSES, MASK, mode="seq-mean-token-sum", length_normaliser=0)
    with pytest.raises(ValueError, match=r"must be 2-D \[B, T\]"):
        aggregate_loss(torch.zeros(3), torch.ones(3), mode="seq-mean-token-mean")


def test_no_mask_means_every_element_counts():
    x = torch.tensor([[1.0, 2.0, 6.0], [3.0, -4.0, 0.5]])
    ones = torch.ones_like(x, dtype=torch.bool)
    for dim in (None, 0, 1):
        torch.testing.assert_close(masked_mean(x, None, dim=dim), masked_mean(x, ones, dim=dim))
        torch.testing.assert_close(masked_sum(x, None, dim=dim), masked_sum(x, ones, dim=dim))
    for unbiased in (False, True):
        torch.testing.assert_close(masked_var(x, None, unbiased=unbiased), masked_var(x, ones, unbiased=unbiased))
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        torch.testing.assert_close(aggregate_loss(x, None, mode=mode), aggregate_loss(x, ones, mode=mode))
    close(masked_mean(torch.zeros(0), None), 0.0)  # nothing to average gives 0, as with a mask
    close(masked_var(torch.tensor([2.0]), None), 0.0)
