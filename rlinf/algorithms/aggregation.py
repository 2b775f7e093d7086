"""Loss aggregation: how per-token losses ``[B, T]`` become one scalar.

The choice changes how much each token weighs. ``token-mean`` weighs every valid token in the
batch equally (long answers weigh more in total); ``seq-mean-token-mean`` weighs every sequence
equally (tokens of long answers weigh less each); ``seq-mean-token-sum`` sums tokens, so with a
fixed ``length_normaliser`` (Dr. GRPO divides by the maximum generation length) no length bias is
introduced by the normalisation at all.

A row with no valid token is padding, not a sequence: the ``seq-*`` modes average over the rows
that have at least one valid token, and a batch with none gives 0.
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import Tensor

from rlinf.algorithms import _checks
from rlinf.algorithms.masked import masked_mean, masked_sum

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)


def aggregate_loss(
    losses: Tensor,
    mask: Tensor | None,
    *,
    mode: Aggregation = "token-mean",
    length_normaliser: float | None = None,
) -> Tensor:
    """Reduces per-token losses to a scalar over the valid tokens, as ``mode`` says.

    Args:
        losses: per-token losses ``[B, T]`` (any shape for ``token-mean``).
        mask: same shape; true (or 1) marks a token that counts; ``None``: every token counts.
        mode: ``token-mean`` (mean over all valid tokens), ``seq-mean-token-mean`` (mean within
            each sequence, then over sequences) or ``seq-mean-token-sum`` (sum within each sequence,
            then mean over sequences).
        length_normaliser: only with ``seq-mean-token-sum``: divide each sequence's sum by this
            constant (e.g. the maximum response length, as Dr. GRPO does).
    """
    losses = _checks.floating("losses", losses)
    m = _checks.optional_mask("mask", mask, losses, "losses")
    _checks.choice("mode", mode, AGGREGATIONS)
    if length_normaliser is not None:
        if mode != "seq-mean-token-sum":
            raise ValueError(
                f"length_normaliser={length_normaliser!r} only applies to mode='seq-mean-token-sum', "
                f"but mode={mode!r}; drop it or switch the mode."
            )
        length_normaliser = _checks.in_range(
            "length_normaliser", length_normaliser, 1e-12, float("inf"), "Use e.g. the maximum response length."
        )
    if mode == "token-mean":
        return masked_mean(losses, m)
    _checks.ndim(
        "losses", losses, 2, f"[B, T] (sequences x tokens) for mode={mode!r}", "reshape it, or use mode='token-mean'"
    )
    if mode == "seq-mean-token-mean":
        per_seq = masked_mean(losses, m, dim=1)
    else:
        per_seq = masked_sum(losses, m, dim=1)
        if length_normaliser is not None:
            per_seq = per_seq / length_normaliser
    return masked_mean(per_seq, None if m is None else m.any(dim=1))
