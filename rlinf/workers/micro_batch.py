"""Elastic micro-batches: take what has arrived, between a minimum and a maximum number of groups."""

from __future__ import annotations

from rlinf.channel import Channel, Item


class ElasticPull:
    """Pulls micro-batches from a channel and remembers their sizes for the step's metrics.

    Each pull waits for ``min_groups`` items (fewer only when the rank's share has fewer left),
    then also takes whatever else has already arrived, up to ``max_groups``. A stage that keeps up
    with its producer so sees small micro-batches and adds no latency; one that falls behind
    catches up with larger ones. Items are counted by their channel weight (1 per group).

    Args:
        min_groups: the least a pull waits for.
        max_groups: the most a pull takes.
    """

    def __init__(self, min_groups: int, max_groups: int) -> None:
        if min_groups < 1 or max_groups < min_groups:
            raise ValueError(
                f"micro-batch bounds min={min_groups}, max={max_groups}: need 1 <= min <= max; e.g. min=1, max=8."
            )
        self.min_groups = min_groups
        self.max_groups = max_groups
        self.sizes: list[int] = []

    def pull(self, inp: Channel, remaining: int) -> list[Item]:
        """The next micro-batch of at most ``remaining`` items; ``[]`` once ``inp`` is closed and drained."""
        if remaining < 1:
            raise ValueError(f"pull(remaining={remaining}): nothing left to take; stop pulling at 0.")
        lo = min(self.min_groups, remaining)
        hi = min(self.max_groups, remaining)
        items = inp.get_batch_items(lo, max_weight=hi)
        if items:
            self.sizes.append(len(items))
        return items

    def metrics(self, prefix: str) -> dict[str, float]:
        """``<prefix>/micro_batches`` and the mean, min and max groups per micro-batch."""
        sizes = self.sizes or [0]
        return {
            f"{prefix}/micro_batches": float(len(self.sizes)),
            f"{prefix}/micro_batch_mean": sum(sizes) / len(sizes),
            f"{prefix}/micro_batch_min": float(min(sizes)),
            f"{prefix}/micro_batch_max": float(max(sizes)),
        }
