"""Masked reductions: sums, means, variances and whitening over the valid elements of a tensor.

A mask is a bool tensor, or 0/1 numbers, of the same shape as the values; invalid elements are
ignored even when they hold ``inf`` or ``nan`` (padding log-probs often do). A reduction over no
valid elements gives 0, never ``nan``, so fully masked rows are harmless. ``mask=None`` means every
element is valid (per-sample data such as embodied transitions), and skips the masking work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlinf.algorithms import _checks


def masked_sum(values: Tensor, mask: Tensor | None, *, dim: int | None = None) -> Tensor:
    """Sum of the valid elements, over all of them or along ``dim``.

    Args:
        values: any shape.
        mask: same shape as ``values``; true (or 1) marks a valid element.
        dim: reduce along this dimension only; ``None`` reduces everything to a scalar.
    """
    values = _checks.floating("values", values)
    m = _checks.optional_mask("mask", mask, values, "values")
    kept = zero_invalid(values, m)
    return kept.sum() if dim is None else kept.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor | None, *, dim: int | None = None) -> Tensor:
    """Mean of the valid elements, over all of them or along ``dim``; 0 where nothing is valid.

    Args:
        values: any shape.
        mask: same shape as ``values``; true (or 1) marks a valid element.
        dim: reduce along this dimension only; ``None`` reduces everything to a scalar.
    """
    values = _checks.floating("values", values)
    m = _checks.optional_mask("mask", mask, values, "values")
    if m is None:
        if values.numel() == 0:
            return values.sum() if dim is None else values.sum(dim=dim)
        return values.mean() if dim is None else values.mean(dim=dim)
    total = masked_sum(values, m, dim=dim)
    count = m.sum() if dim is None else m.sum(dim=dim)
    # Dividing by a count of 1 where there is none keeps the gradient finite (0/0 would give nan).
    return total / count.clamp(min=1).to(values.dtype)


def masked_var(values: Tensor, mask: Tensor | None, *, unbiased: bool = False) -> Tensor:
    """Variance of all the valid elements (a scalar); 0 when fewer than two are valid.

    Args:
        values: any shape.
        mask: same shape as ``values``; true (or 1) marks a valid element.
        unbiased: divide by ``n - 1`` (Bessel) instead of ``n``.
    """
    values = _checks.floating("values", values)
    m = _checks.optional_mask("mask", mask, values, "values")
    if m is None:
        n = values.numel()
        return values.var(correction=int(unbiased)) if n > 1 else values.new_zeros(())
    values = zero_invalid(values, m)
    mean = masked_mean(values, m)
    sq = masked_sum((values - mean) ** 2, m)
    count = m.sum().to(values.dtype)
    denom = count - 1 if unbiased else count
    return sq / denom.clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalises the valid elements to zero mean and unit (population) std; invalid ones become 0.

    Args:
        values: any shape, e.g. advantages ``[B, T]``.
        mask: same shape as ``values``; true (or 1) marks a valid element.
        shift_mean: if false, only divide by the std and keep the original mean.
        eps: added to the std so a constant input gives zeros rather than ``nan``.
    """
    values = _checks.floating("values", values)
    m = _checks.as_mask("mask", mask, values, "values")
    eps = _checks.in_range("eps", eps, 0.0, float("inf"))
    values = zero_invalid(values, m)
    mean = masked_mean(values, m)
    std = masked_var(values, m).sqrt()
    out = (values - mean) / (std + eps)
    if not shift_mean:
        out = out + mean
    return zero_invalid(out, m)


def zero_invalid(values: Tensor, mask: Tensor | None) -> Tensor:
    """``values`` with every invalid element set to 0, so that neither it nor its gradient is ``nan``.

    ``values * mask`` is not enough: ``inf * 0`` is ``nan``, and a ``nan`` in a padded position
    reaches every parameter through the backward pass.

    Args:
        values: any shape.
        mask: same shape as ``values``; true (or 1) marks a valid element.
    """
    values = _checks.tensor("values", values)
    m = _checks.optional_mask("mask", mask, values, "values")
    if m is None:
        return values
    return torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device))
