"""Policy and value losses: PPO clip (asymmetric, dual-clip), decoupled PPO, value clip, REINFORCE, DPO, IPO.

Every loss returns ``(loss, metrics)``: a scalar to call ``backward`` on and a small dict of
detached 0-d tensors (call ``.item()`` when logging; leaving them as tensors avoids a device sync
per micro-batch). Per-token metrics are means over the valid tokens, whatever the aggregation.
Old, reference and behaviour log-probs and advantages are treated as constants (detached here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlinf.algorithms import _checks
from rlinf.algorithms.aggregation import Aggregation, aggregate_loss
from rlinf.algorithms.masked import masked_mean, masked_var, zero_invalid

LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: ratios never get there in practice, and exp cannot overflow


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    aggregation: Aggregation = "token-mean",
    length_normaliser: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate ``max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))``, ``r = p / p_old``.

    With ``dual_clip = c``, tokens with a negative advantage lose at most ``-c * A`` (their
    gradient stops there), so a ratio that has grown huge cannot blow the loss up; tokens with a
    positive advantage are unaffected.

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the policy being trained.
        old_logprobs: ``[B, T]`` log-probs under the policy that sampled them.
        advantages: ``[B, T]``, or ``[B]`` (one per sequence, used for all its tokens).
        mask: ``[B, T]``; true (or 1) marks a token that counts. ``None``: every element counts
            (per-sample data, e.g. ``[B]`` embodied transitions; skips the masking work).
        clip_low: the ratio is clipped below at ``1 - clip_low``; in ``[0, 1]``.
        clip_high: the ratio is clipped above at ``1 + clip_high`` (DAPO's clip-higher uses a
            larger value than ``clip_low``); at least 0.
        dual_clip: ``c > 1`` bounding the loss of negative-advantage tokens, or ``None``.
        aggregation: how per-token losses become a scalar (see ``aggregate_loss``).
        length_normaliser: constant divisor for ``seq-mean-token-sum`` (Dr. GRPO).

    Returns:
        ``(loss, metrics)`` with metrics ``clip_fraction`` (tokens whose ratio clipping stopped
        the gradient), ``dual_clip_fraction``, ``approx_kl`` (k3 estimate of KL(old || new)) and
        ``ratio_mean``.
    """
    logprobs, old_logprobs, advantages, m = _token_inputs(
        ("logprobs", logprobs), ("old_logprobs", old_logprobs), advantages, mask
    )
    log_ratio = logprobs - old_logprobs
    per_token, ratio, clipped, dual = _clipped_surrogate(log_ratio, advantages, clip_low, clip_high, dual_clip)
    loss = aggregate_loss(per_token, m, mode=aggregation, length_normaliser=length_normaliser)
    return loss, _ratio_metrics(log_ratio, ratio, clipped, dual, m)


def decoupled_ppo_loss(
    logprobs: Tensor,
    proximal_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor | None,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    weight_cap: float | None = 5.0,
    aggregation: Aggregation = "token-mean",
    length_normaliser: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Decoupled PPO for off-policy (asynchronous) data: clip around a proximal policy, reweight for the behaviour one.

    The per-token loss is ``w * ppo_clip(p / p_prox)`` with ``w = min(p_prox / p_behav, weight_cap)``.
    The samples came from a stale behaviour policy; the trust region is taken around the
    proximal policy (usually the current weights before this update, whose log-probs are
    recomputed), and the importance weight ``w`` corrects for the mismatch. Capping ``w``
    (truncated importance sampling) trades a little bias for bounded variance.

    Args:
        logprobs: ``[B, T]`` log-probs under the policy being trained.
        proximal_logprobs: ``[B, T]`` log-probs under the proximal policy.
        behaviour_logprobs: ``[B, T]`` log-probs under the policy that sampled the tokens.
        advantages: ``[B, T]``, or ``[B]`` (one per sequence, used for all its tokens).
        mask: ``[B, T]``; true (or 1) marks a token that counts.
        clip_low: the ratio to the proximal policy is clipped below at ``1 - clip_low``.
        clip_high: and above at ``1 + clip_high``.
        dual_clip: ``c > 1`` bounding the loss of negative-advantage tokens, or ``None``.
        weight_cap: upper bound of the behaviour importance weight (> 0), or ``None`` for no cap.
        aggregation: how per-token losses become a scalar (see ``aggregate_loss``).
        length_normaliser: constant divisor for ``seq-mean-token-sum`` (Dr. GRPO).

    Returns:
        ``(loss, metrics)``: the metrics of ``ppo_clip_loss`` (against the proximal policy) plus
        ``behaviour_weight_mean``, ``behaviour_weight_capped_fraction`` and ``behaviour_kl``
        (k3 estimate of KL(behaviour || proximal)).
    """
    logprobs, proximal_logprobs, advantages, m = _token_inputs(
        ("logprobs", logprobs), ("proximal_logprobs", proximal_logprobs), advantages, mask
    )
    behaviour_logprobs = _checks.floating("behaviour_logprobs", behaviour_logprobs)
    _checks.same_shape(("logprobs", logprobs), ("behaviour_logprobs", behaviour_logprobs))
    behaviour_logprobs = zero_invalid(behaviour_logprobs.detach(), m)
    if weight_cap is not None:
        weight_cap = _checks.in_range("weight_cap", weight_cap, 1e-12, float("inf"), "Try 5.0, or None.")

    behaviour_log_ratio = (proximal_logprobs - behaviour_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    raw_weight = torch.exp(behaviour_log_ratio)
    weight = raw_weight if weight_cap is None else raw_weight.clamp(max=weight_cap)
    log_ratio = logprobs - proximal_logprobs
    per_token, ratio, clipped, dual = _clipped_surrogate(log_ratio, advantages, clip_low, clip_high, dual_clip)
    loss = aggregate_loss(weight * per_token, m, mode=aggregation, length_normaliser=length_normaliser)

    metrics = _ratio_metrics(log_ratio, ratio, clipped, dual, m)
    metrics["behaviour_weight_mean"] = masked_mean(weight, m)
    capped = raw_weight > weight_cap if weight_cap is not None else torch.zeros_like(raw_weight, dtype=torch.bool)
    metrics["behaviour_weight_capped_fraction"] = masked_mean(capped.to(weight.dtype), m)
    metrics["behaviour_kl"] = masked_mean(raw_weight - 1 - behaviour_log_ratio, m)
    return loss, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor | None,
    *,
    clip: float | None = 0.2,
    aggregation: Aggregation = "token-mean",
    length_normaliser: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss ``0.5 * max((v - R)^2, (v_old + clip(v - v_old, -c, c) - R)^2)``.

    Args:
        values: ``[B, T]`` (or embodied ``[T, N]``) predictions of the critic being trained.
        old_values: same shape, the critic's predictions when the data was collected.
        returns: same shape, the value targets (e.g. from ``gae`` or ``token_gae``).
        mask: same shape; true (or 1) marks an element that counts; ``None``: every element counts.
        clip: ``c``, how far a prediction may move from ``old_values`` before its gradient stops
            (in reward units, at least 0); ``None`` gives the plain squared error.
        aggregation: how per-token losses become a scalar (see ``aggregate_loss``).
        length_normaliser: constant divisor for ``seq-mean-token-sum``.

    Returns:
        ``(loss, metrics)`` with metrics ``clip_fraction`` (elements where the clipped term was
        the larger one) and ``explained_variance`` (``1 - Var(R - v) / Var(R)``; 1 is perfect).
    """
    values = _checks.floating("values", values)
    old_values = _checks.floating("old_values", old_values)
    returns = _checks.floating("returns", returns)
    _checks.same_shape(("values", values), ("old_values", old_values), ("returns", returns))
    m = _checks.optional_mask("mask", mask, values, "values")
    values = zero_invalid(values, m)
    old_values, returns = zero_invalid(old_values.detach(), m), zero_invalid(returns.detach(), m)

    unclipped = (values - returns) ** 2
    if clip is None:
        per_token = 0.5 * unclipped
        clipped_frac = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        clip = _checks.in_range("clip", clip, 0.0, float("inf"), "Use e.g. 0.2, or None for no clipping.")
        moved = old_values + (values - old_values).clamp(-clip, clip)
        clipped_sq = (moved - returns) ** 2
        per_token = 0.5 * torch.maximum(unclipped, clipped_sq)
        clipped_frac = masked_mean((clipped_sq > unclipped).to(values.dtype).detach(), m)
    loss = aggregate_loss(per_token, m, mode=aggregation, length_normaliser=length_normaliser)
    with torch.no_grad():
        var_returns = masked_var(returns, m)
        explained = 1 - masked_var(returns - values, m) / var_returns.clamp(min=1e-8)
    return loss, {"clip_fraction": clipped_frac, "explained_variance": explained}


def policy_gradient_loss(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    aggregation: Aggregation = "token-mean",
    length_normaliser: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Plain REINFORCE loss ``-A * log p`` per token: no ratio, no clipping (on-policy only).

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the policy being trained.
        advantages: ``[B, T]``, or ``[B]`` (one per sequence, used for all its tokens).
        mask: ``[B, T]``; true (or 1) marks a token that counts.
        aggregation: how per-token losses become a scalar (see ``aggregate_loss``).
        length_normaliser: constant divisor for ``seq-mean-token-sum``.

    Returns:
        ``(loss, metrics)`` with metric ``logprob_mean``.
    """
    logprobs, _, advantages, m = _token_inputs(("logprobs", logprobs), None, advantages, mask)
    loss = aggregate_loss(-advantages * logprobs, m, mode=aggregation, length_normaliser=length_normaliser)
    return loss, {"logprob_mean": masked_mean(logprobs.detach(), m)}


def dpo_loss(
    chosen_logprobs: Tensor,
    rejected_logprobs: Tensor,
    ref_chosen_logprobs: Tensor,
    ref_rejected_logprobs: Tensor,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO: ``-log sigmoid(beta * ((c - c_ref) - (r - r_ref)))``, averaged over pairs.

    With ``label_smoothing = e`` the preference is trusted with probability ``1 - e``: the loss
    becomes ``-(1 - e) log sigmoid(z) - e log sigmoid(-z)`` (conservative DPO).

    Args:
        chosen_logprobs: ``[B]`` sequence log-probs (summed over tokens) of the chosen answers
            under the policy.
        rejected_logprobs: ``[B]`` the same for the rejected answers.
        ref_chosen_logprobs: ``[B]`` chosen answers under the reference policy.
        ref_rejected_logprobs: ``[B]`` rejected answers under the reference policy.
        beta: strength of the implicit KL constraint, > 0.
        label_smoothing: probability that a label is flipped, in ``[0, 0.5)``.

    Returns:
        ``(loss, metrics)`` with metrics ``chosen_reward`` and ``rejected_reward`` (means of
        ``beta * (logp - logp_ref)``), ``reward_margin`` and ``reward_accuracy`` (fraction of pairs
        where the chosen reward is higher).
    """
    chosen, rejected = _preference_inputs(
        chosen_logprobs, rejected_logprobs, ref_chosen_logprobs, ref_rejected_logprobs
    )
    beta = _checks.in_range("beta", beta, 1e-12, float("inf"), "Try 0.1.")
    label_smoothing = _checks.in_range("label_smoothing", label_smoothing, 0.0, 0.5)
    if label_smoothing == 0.5:
        raise ValueError("label_smoothing=0.5 makes every preference a coin flip, so nothing is learnt; use < 0.5.")
    z = beta * (chosen - rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses.mean(), _preference_metrics(beta * chosen, beta * rejected)


def ipo_loss(
    chosen_logprobs: Tensor,
    rejected_logprobs: Tensor,
    ref_chosen_logprobs: Tensor,
    ref_rejected_logprobs: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """IPO: ``((c - c_ref) - (r - r_ref) - 1 / (2 * beta))^2``, averaged over pairs.

    Unlike DPO the loss does not vanish as the margin grows: it pulls the log-ratio margin to
    ``1 / (2 * beta)``, which keeps deterministic preferences from driving the policy arbitrarily far.

    Args:
        chosen_logprobs: ``[B]`` sequence log-probs of the chosen answers under the policy (the
            IPO paper sums over tokens; some implementations average, pass whichever you mean).
        rejected_logprobs: ``[B]`` the same for the rejected answers.
        ref_chosen_logprobs: ``[B]`` chosen answers under the reference policy.
        ref_rejected_logprobs: ``[B]`` rejected answers under the reference policy.
        beta: regularisation strength, > 0; the target margin is ``1 / (2 * beta)``.

    Returns:
        ``(loss, metrics)`` with the same metrics as ``dpo_loss``.
    """
    chosen, rejected = _preference_inputs(
        chosen_logprobs, rejected_logprobs, ref_chosen_logprobs, ref_rejected_logprobs
    )
    beta = _checks.in_range("beta", beta, 1e-12, float("inf"), "Try 0.1.")
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return losses.mean(), _preference_metrics(beta * chosen, beta * rejected)


def _token_inputs(
    policy: tuple[str, Tensor],
    old: tuple[str, Tensor] | None,
    advantages: Tensor,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Checks and cleans per-token inputs; returns ``(logprobs, old_logprobs, advantages, mask)``.

    Invalid positions are zeroed (padding log-probs may be ``-inf``), ``old`` and ``advantages``
    are detached, and ``[B]`` advantages are broadcast over the tokens.
    """
    name, logprobs = policy
    logprobs = _checks.floating(name, logprobs)
    m = _checks.optional_mask("mask", mask, logprobs, name)
    advantages = _checks.floating("advantages", advantages).detach()
    if advantages.dim() == 1 and logprobs.dim() == 2 and advantages.shape[0] == logprobs.shape[0]:
        advantages = advantages.unsqueeze(1).expand_as(logprobs)
    _checks.same_shape((name, logprobs), ("advantages", advantages))
    logprobs, advantages = zero_invalid(logprobs, m), zero_invalid(advantages, m)
    if old is None:
        return logprobs, logprobs.detach(), advantages, m
    old_name, old_logprobs = old
    old_logprobs = _checks.floating(old_name, old_logprobs)
    _checks.same_shape((name, logprobs), (old_name, old_logprobs))
    return logprobs, zero_invalid(old_logprobs.detach(), m), advantages, m


def _clipped_surrogate(
    log_ratio: Tensor,
    advantages: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token PPO loss; returns ``(loss, ratio, clipped, dual_clipped)`` (the last two bool)."""
    clip_low = _checks.in_range("clip_low", clip_low, 0.0, 1.0, "Use e.g. 0.2.")
    clip_high = _checks.in_range("clip_high", clip_high, 0.0, float("inf"), "Use e.g. 0.2 (or 0.28 for DAPO).")
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = clipped_loss > unclipped
    if dual_clip is None:
        return loss, ratio, clipped, torch.zeros_like(clipped)
    if not float(dual_clip) > 1.0:
        raise ValueError(
            f"dual_clip={dual_clip!r} must be greater than 1: it caps the loss of negative-advantage tokens "
            "at dual_clip * |A|, above where the ratio clip already acts. Try 3.0, or None to disable it."
        )
    bound = -advantages * dual_clip
    dual = (advantages < 0) & (loss > bound)
    return torch.where(dual, bound, loss), ratio, clipped, dual


def _ratio_metrics(
    log_ratio: Tensor, ratio: Tensor, clipped: Tensor, dual: Tensor, m: Tensor | None
) -> dict[str, Tensor]:
    with torch.no_grad():
        log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return {
            "clip_fraction": masked_mean(clipped.to(ratio.dtype), m),
            "dual_clip_fraction": masked_mean(dual.to(ratio.dtype), m),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
        }


def _preference_inputs(
    chosen_logprobs: Tensor,
    rejected_logprobs: Tensor,
    ref_chosen_logprobs: Tensor,
    ref_rejected_logprobs: Tensor,
) -> tuple[Tensor, Tensor]:
    """Checks the four ``[B]`` inputs; returns the log-ratios to the reference ``(chosen, rejected)``."""
    named = [
        ("chosen_logprobs", _checks.floating("chosen_logprobs", chosen_logprobs)),
        ("rejected_logprobs", _checks.floating("rejected_logprobs", rejected_logprobs)),
        ("ref_chosen_logprobs", _checks.floating("ref_chosen_logprobs", ref_chosen_logprobs).detach()),
        ("ref_rejected_logprobs", _checks.floating("ref_rejected_logprobs", ref_rejected_logprobs).detach()),
    ]
    _checks.ndim(*named[0], 1, "[B] (one summed log-prob per sequence)")
    _checks.same_shape(*named)
    if named[0][1].numel() == 0:
        raise ValueError("chosen_logprobs is empty; pass at least one preference pair.")
    (_, c), (_, r), (_, rc), (_, rr) = named
    return c - rc, r - rr


def _preference_metrics(chosen_reward: Tensor, rejected_reward: Tensor) -> dict[str, Tensor]:
    with torch.no_grad():
        return {
            "chosen_reward": chosen_reward.mean(),
            "rejected_reward": rejected_reward.mean(),
            "reward_margin": (chosen_reward - rejected_reward).mean(),
            "reward_accuracy": (chosen_reward > rejected_reward).to(chosen_reward.dtype).mean(),
        }
