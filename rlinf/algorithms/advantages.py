"""Advantage estimators: GRPO, RLOO, REINFORCE++ and GAE (embodied ``[T, N]`` and per-token ``[B, T]``).

Advantages are targets, not parameters: none of these functions is meant to be differentiated
through. Pass detached tensors (values from a critic in particular).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlinf.algorithms import _checks
from rlinf.algorithms.masked import masked_whiten, zero_invalid


def group_advantage(rewards: Tensor, group_size: int, *, eps: float = 1e-6, scale: bool = True) -> Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by the group's std if ``scale``.

    The std is the population one (divide by ``G``, not ``G - 1``): the group is the whole set
    being normalised, not a sample of a larger one, and so every group comes out with unit
    variance whatever ``G`` is. Implementations that use the Bessel-corrected std give advantages
    smaller by ``sqrt((G - 1) / G)`` (0.71 for ``G = 2``). An all-equal group gives zeros.

    Args:
        rewards: ``[B * G]`` sequence rewards; groups are contiguous runs of ``group_size``.
        group_size: ``G``, samples per prompt (at least 2).
        eps: added to the std so an all-equal group gives 0 rather than ``nan``.
        scale: divide by the group std (GRPO); ``False`` only subtracts the mean (Dr. GRPO).

    Returns:
        ``[B * G]`` advantages.
    """
    groups = _grouped(rewards, group_size)
    eps = _checks.in_range("eps", eps, 0.0, float("inf"))
    adv = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (groups.std(dim=1, keepdim=True, correction=0) + eps)
    return adv.reshape(-1)


def rloo_advantage(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO advantages: each reward minus the mean of the other ``G - 1`` rewards in its group.

    Equal to ``G / (G - 1) * (r - group mean)``; an all-equal group gives zeros.

    Args:
        rewards: ``[B * G]`` sequence rewards; groups are contiguous runs of ``group_size``.
        group_size: ``G``, samples per prompt (at least 2, so that there is someone to leave out).

    Returns:
        ``[B * G]`` advantages.
    """
    groups = _grouped(rewards, group_size)
    g = groups.shape[1]
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (g - 1)
    return (groups - others_mean).reshape(-1)


def shaped_token_rewards(
    seq_rewards: Tensor,
    mask: Tensor,
    *,
    kl: Tensor | None = None,
    kl_coef: float = 0.0,
) -> Tensor:
    """Per-token rewards: ``-kl_coef * kl`` on every valid token plus the sequence reward on the last one.

    This is the reward REINFORCE++ and token-level PPO accumulate. A row with no valid token
    gets all zeros (its sequence reward has nowhere to go).

    Args:
        seq_rewards: ``[B]`` one reward per sequence.
        mask: ``[B, T]`` response mask; true (or 1) marks a generated token.
        kl: ``[B, T]`` per-token KL estimate (e.g. ``token_kl(..., estimator="k1")``), detached.
        kl_coef: weight of the KL penalty (often called beta), at least 0.

    Returns:
        ``[B, T]`` token rewards, 0 outside the mask.
    """
    seq_rewards = _checks.floating("seq_rewards", seq_rewards)
    _checks.ndim("seq_rewards", seq_rewards, 1, "[B]")
    mask = _checks.tensor("mask", mask)
    _checks.ndim("mask", mask, 2, "[B, T]")
    m = mask if mask.dtype == torch.bool else mask != 0
    if m.shape[0] != seq_rewards.shape[0]:
        raise ValueError(
            f"seq_rewards has {seq_rewards.shape[0]} entries but mask has {m.shape[0]} rows; "
            "pass one reward per sequence, in the order of the mask's rows."
        )
    kl_coef = _checks.in_range("kl_coef", kl_coef, 0.0, float("inf"), "The penalty subtracts kl_coef * kl.")
    if kl is None:
        rewards = torch.zeros(m.shape, dtype=seq_rewards.dtype, device=seq_rewards.device)
    else:
        kl = _checks.floating("kl", kl)
        _checks.same_shape(("mask", m), ("kl", kl))
        rewards = zero_invalid(-kl_coef * kl, m).to(seq_rewards.dtype)
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, positions, 0).amax(dim=1, keepdim=True)
    has_token = m.any(dim=1)
    final = torch.where(has_token, seq_rewards, torch.zeros_like(seq_rewards))
    return rewards.scatter_add(1, last, final.unsqueeze(1))


def returns_to_go(token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0) -> Tensor:
    """Discounted sum of the rewards from each valid token to the end of its sequence.

    Tokens outside the mask add no reward and no discount: the return passes through them, so a
    gap in the mask (e.g. tool output in a multi-turn answer) does not cut the sequence.

    Args:
        token_rewards: ``[B, T]`` per-token rewards.
        mask: ``[B, T]``; true (or 1) marks a generated token.
        gamma: discount per valid token, in ``[0, 1]``.

    Returns:
        ``[B, T]`` returns, 0 outside the mask.
    """
    token_rewards = _checks.floating("token_rewards", token_rewards)
    _checks.ndim("token_rewards", token_rewards, 2, "[B, T]")
    m = _checks.as_mask("mask", mask, token_rewards, "token_rewards")
    gamma = _checks.in_range("gamma", gamma, 0.0, 1.0, "It is a per-token discount, usually 1.0.")
    running = torch.zeros_like(token_rewards[:, 0])
    out = []
    for t in reversed(range(token_rewards.shape[1])):
        running = torch.where(m[:, t], token_rewards[:, t] + gamma * running, running)
        out.append(running)
    return zero_invalid(torch.stack(out[::-1], dim=1), m)


def reinforce_pp_advantage(token_rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, eps: float = 1e-8) -> Tensor:
    """REINFORCE++ advantages: per-token returns-to-go, whitened over every valid token in the batch.

    Args:
        token_rewards: ``[B, T]`` per-token rewards, usually from ``shaped_token_rewards``.
        mask: ``[B, T]`` response mask; true (or 1) marks a generated token.
        gamma: discount per valid token, in ``[0, 1]``.
        eps: added to the std so a constant batch gives 0 rather than ``nan``.

    Returns:
        ``[B, T]`` advantages with zero mean and unit (population) std over the valid tokens,
        0 outside the mask.
    """
    returns = returns_to_go(token_rewards, mask, gamma=gamma)
    return masked_whiten(returns, mask, eps=eps)


def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    *,
    gamma: float = 0.99,
    lam: float = 0.95,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over time-major rollouts of vectorised envs.

    Step ``t`` of env ``n`` went from state ``s`` (value ``values[t, n]``) to state ``s'`` (value
    ``next_values[t, n]``). When the episode terminated there, ``s'`` is worth nothing and is not
    bootstrapped; when it was truncated (time limit), ``s'`` is the final observation before the
    reset and is bootstrapped. Either way the advantage does not flow back across the boundary.
    If both flags are set, termination wins.

    Build ``next_values`` as ``values`` shifted by one step, with the value of the observation
    after the last step in the final row, and the value of the final observation wherever an
    episode was truncated (where it terminated any number will do).

    Args:
        rewards: ``[T, N]`` reward of each step (time first; trailing dims are envs).
        values: ``[T, N]`` value of the state each step started from.
        next_values: ``[T, N]`` value of the state each step led to (see above).
        terminated: ``[T, N]`` bool (or 0/1): the episode ended in a terminal state at this step.
        truncated: ``[T, N]`` bool (or 0/1): the episode was cut off (time limit) at this step.
        gamma: discount per step, in ``[0, 1]``.
        lam: GAE lambda, in ``[0, 1]`` (0: one-step TD, 1: Monte Carlo with bootstrap).

    Returns:
        ``(advantages, returns)``, both ``[T, N]``; ``returns = advantages + values`` are the
        value targets.
    """
    rewards = _checks.floating("rewards", rewards)
    values = _checks.floating("values", values)
    next_values = _checks.floating("next_values", next_values)
    if rewards.dim() < 1:
        raise ValueError("rewards is a scalar but must be time-major [T, N]; add the time dimension.")
    term = _checks.as_mask("terminated", terminated, rewards, "rewards")
    trunc = _checks.as_mask("truncated", truncated, rewards, "rewards")
    _checks.same_shape(("rewards", rewards), ("values", values), ("next_values", next_values))
    gamma = _checks.in_range("gamma", gamma, 0.0, 1.0, "It is a per-step discount, e.g. 0.99.")
    lam = _checks.in_range("lam", lam, 0.0, 1.0, "It is the GAE lambda, e.g. 0.95.")

    zero = torch.zeros((), dtype=rewards.dtype, device=rewards.device)
    bootstrap = torch.where(term, zero, next_values)
    deltas = rewards + gamma * bootstrap - values
    carry = gamma * lam * (~(term | trunc)).to(rewards.dtype)
    running = torch.zeros_like(rewards[0])
    out = []
    for t in reversed(range(rewards.shape[0])):
        running = deltas[t] + carry[t] * running
        out.append(running)
    advantages = torch.stack(out[::-1])
    return advantages, advantages + values


def token_gae(
    token_rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    eps: float = 1e-8,
) -> tuple[Tensor, Tensor]:
    """GAE over generated tokens for LLM PPO; the sequence ends after its last valid token.

    Each valid token is one step; the state after the last valid token is terminal (value 0).
    Tokens outside the mask are skipped (no reward, no discount, no value), so gaps such as tool
    output inside a multi-turn answer do not break the recursion.

    Args:
        token_rewards: ``[B, T]`` per-token rewards, usually from ``shaped_token_rewards``.
        values: ``[B, T]`` critic value of the prefix before each token, detached.
        mask: ``[B, T]`` response mask; true (or 1) marks a generated token.
        gamma: discount per token, in ``[0, 1]``.
        lam: GAE lambda, in ``[0, 1]``.
        whiten: normalise the advantages over all valid tokens of the batch (the returns are
            computed before this and are not changed by it).
        eps: added to the std when whitening.

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` and 0 outside the mask.
    """
    token_rewards = _checks.floating("token_rewards", token_rewards)
    values = _checks.floating("values", values)
    _checks.ndim("token_rewards", token_rewards, 2, "[B, T]")
    _checks.same_shape(("token_rewards", token_rewards), ("values", values))
    m = _checks.as_mask("mask", mask, token_rewards, "token_rewards")
    gamma = _checks.in_range("gamma", gamma, 0.0, 1.0, "It is a per-token discount, usually 1.0.")
    lam = _checks.in_range("lam", lam, 0.0, 1.0, "It is the GAE lambda, e.g. 0.95.")
    # Padding may hold anything (even nan); it must not leak into the recursion.
    token_rewards, values = zero_invalid(token_rewards, m), zero_invalid(values, m)

    next_value = torch.zeros_like(values[:, 0])
    running = torch.zeros_like(values[:, 0])
    out = []
    for t in reversed(range(values.shape[1])):
        valid = m[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(valid, delta + gamma * lam * running, running)
        next_value = torch.where(valid, values[:, t], next_value)
        out.append(running)
    advantages = zero_invalid(torch.stack(out[::-1], dim=1), m)
    returns = zero_invalid(advantages + values, m)
    if whiten:
        advantages = masked_whiten(advantages, m, eps=eps)
    return advantages, returns


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """``[B * G] -> [B, G]`` after checking the layout."""
    rewards = _checks.floating("rewards", rewards)
    g = _checks.positive_int("group_size", group_size, minimum=1)
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards has shape {tuple(rewards.shape)} but must be flat [B * G] with each prompt's "
            f"samples contiguous; use rewards.reshape(-1) on a [B, G] tensor."
        )
    if g < 2:
        raise ValueError(
            f"group_size={g} leaves every sample alone in its group, so every advantage would be 0; "
            "sample at least 2 responses per prompt."
        )
    n = rewards.shape[0]
    if n == 0 or n % g != 0:
        fix = f"pass whole groups, e.g. the first {n - n % g}" if n >= g else "pass at least one whole group"
        raise ValueError(
            f"rewards has {n} entries, not a positive multiple of group_size={g}; groups are "
            f"contiguous runs of group_size samples of one prompt, so {fix}."
        )
    return rewards.reshape(-1, g)
