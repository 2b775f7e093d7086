"""Per-token estimators of KL(policy || reference) from log-probs of tokens sampled by the policy.

With ``log_r = ref_logprobs - logprobs`` (the log of reference over policy probability):

- ``k1 = -log_r``: unbiased, high variance, can be negative per token.
- ``k2 = 0.5 * log_r**2``: biased but low variance, never negative. As a loss its gradient, on
  policy samples, is in expectation the gradient of KL(policy || reference).
- ``k3 = exp(log_r) - log_r - 1``: unbiased (before its clamp) and never negative, low variance
  near the reference.

Used as a reward penalty, detach the result (``shaped_token_rewards`` expects a plain tensor);
used as a loss term, keep the graph and aggregate it like any per-token loss.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from rlinf.algorithms import _checks
from rlinf.algorithms.masked import zero_invalid

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)

K3_LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: large enough never to matter, small enough not to overflow


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``logprobs - ref_logprobs`` per token.

    Args:
        logprobs: policy log-probs of the sampled tokens, any shape (e.g. ``[B, T]``).
        ref_logprobs: reference log-probs of the same tokens, same shape.
    """
    logprobs, ref_logprobs = _pair(logprobs, ref_logprobs)
    return logprobs - ref_logprobs


def kl_k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """``0.5 * (logprobs - ref_logprobs)**2`` per token.

    Args:
        logprobs: policy log-probs of the sampled tokens, any shape (e.g. ``[B, T]``).
        ref_logprobs: reference log-probs of the same tokens, same shape.
    """
    logprobs, ref_logprobs = _pair(logprobs, ref_logprobs)
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor, *, max_value: float = 10.0) -> Tensor:
    """``exp(ref - logp) - (ref - logp) - 1`` per token, clamped to ``[0, max_value]``.

    The log-ratio ``ref - logp`` is clamped to ``[-20, 20]`` before ``exp`` so it cannot overflow,
    and the estimate to ``[0, max_value]`` (tokens the reference finds far less likely would
    otherwise dominate the batch; a clamped token passes no gradient).

    Args:
        logprobs: policy log-probs of the sampled tokens, any shape (e.g. ``[B, T]``).
        ref_logprobs: reference log-probs of the same tokens, same shape.
        max_value: upper clamp of the per-token estimate.
    """
    logprobs, ref_logprobs = _pair(logprobs, ref_logprobs)
    max_value = _checks.in_range("max_value", max_value, 0.0, float("inf"))
    log_r = (ref_logprobs - logprobs).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (torch.exp(log_r) - log_r - 1).clamp(0.0, max_value)


def token_kl(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    *,
    estimator: KLEstimator = "k3",
    mask: Tensor | None = None,
) -> Tensor:
    """Per-token KL estimate by name; 0 at tokens outside ``mask``.

    Args:
        logprobs: policy log-probs of the sampled tokens ``[B, T]`` (any shape).
        ref_logprobs: reference log-probs of the same tokens, same shape.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see the module docstring).
        mask: optional, same shape; tokens where it is false get 0 (and no gradient).
    """
    logprobs, ref_logprobs = _pair(logprobs, ref_logprobs)
    _checks.choice("estimator", estimator, KL_ESTIMATORS)
    m = None if mask is None else _checks.as_mask("mask", mask, logprobs, "logprobs")
    if m is not None:
        # Padding log-probs may be -inf; zero them before the estimator so no nan appears.
        logprobs, ref_logprobs = zero_invalid(logprobs, m), zero_invalid(ref_logprobs, m)
    if estimator == "k1":
        kl = kl_k1(logprobs, ref_logprobs)
    elif estimator == "k2":
        kl = kl_k2(logprobs, ref_logprobs)
    else:
        kl = kl_k3(logprobs, ref_logprobs)
    return kl if m is None else zero_invalid(kl, m)


def _pair(logprobs: Tensor, ref_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    logprobs = _checks.floating("logprobs", logprobs)
    ref_logprobs = _checks.floating("ref_logprobs", ref_logprobs)
    _checks.same_shape(("logprobs", logprobs), ("ref_logprobs", ref_logprobs))
    return logprobs, ref_logprobs
