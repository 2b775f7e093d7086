"""RewardWorker: rule-based verification of every sample; attaches rewards and forwards groups.

Groups are taken in elastic micro-batches (``reward.min_micro_batch_groups`` to
``reward.max_micro_batch_groups``): whatever has arrived, so scoring never waits for a full batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from rlinf.channel import Channel
from rlinf.worker import Worker
from rlinf.workers.config import RewardConfig
from rlinf.workers.micro_batch import ElasticPull
from rlinf.workers.rollout import Group, rank_share

# (completion, problem, truncated) -> (reward, correct, reason)
Verifier = Callable[[str, Any, bool], tuple[float, bool, str]]


def math_verifier(task_cfg: Any) -> Verifier:
    """The math task's answer checker (``rlinf.envs.math_task.score_problem``) as a ``Verifier``."""
    from rlinf.envs.math_task import score_problem

    def verify(completion: str, problem: Any, truncated: bool) -> tuple[float, bool, str]:
        result = score_problem(completion, problem, task_cfg, truncated=truncated)
        return float(result.reward), bool(result.correct), result.reason

    return verify


def score_group(group: Group, verifier: Verifier) -> Group:
    """Scores every sample of ``group``; a failed sample gets 0 and a verifier that raises gives 0 too."""
    rewards, correct, reasons = [], [], []
    for text, cut, failure in zip(group.texts, group.truncated, group.failures, strict=True):
        if failure:
            r, c, why = 0.0, False, f"generation failed: {failure}"
        else:
            try:
                r, c, why = verifier(text, group.problem, cut)
            except Exception as e:  # one bad sample must not stop the run
                r, c, why = 0.0, False, f"verifier raised: {type(e).__name__}: {e}"
        rewards.append(float(r))
        correct.append(bool(c))
        reasons.append(why)
    return replace(
        group, rewards=torch.tensor(rewards, dtype=torch.float32), correct=tuple(correct), reasons=tuple(reasons)
    )


class RewardWorker(Worker):
    """Applies a rule-based verifier to each sample.

    Args:
        verifier: ``(completion, problem, truncated) -> (reward, correct, reason)``; see ``math_verifier``.
        cfg: the reward section (micro-batch bounds); default ``RewardConfig()``.
    """

    def __init__(self, verifier: Verifier, cfg: RewardConfig | None = None) -> None:
        self.verifier = verifier
        self.cfg = cfg or RewardConfig()

    def score(self, inp: Channel, out: Channel | None, num_groups: int) -> dict[str, float]:
        """Scores this rank's share of ``num_groups`` groups from ``inp`` and forwards each to ``out``.

        With ``out=None`` the groups are only counted (evaluation). Returns reward mean, accuracy,
        response length and failure counts over the groups this rank saw, and the sizes of the
        micro-batches it took (``reward/micro_batch_*``).
        """
        mine = rank_share(num_groups, self.rank, self.world_size)
        start = time.perf_counter()
        total = count = right = tokens = raised = failed = truncated = 0.0
        pulls = ElasticPull(self.cfg.min_micro_batch_groups, self.cfg.max_micro_batch_groups)
        taken = 0
        while taken < mine:
            items = pulls.pull(inp, mine - taken)
            if not items:
                raise RuntimeError(f"channel {inp.name!r} closed after {taken} of {mine} groups.")
            taken += len(items)
            for item in items:
                group = score_group(item.payload, self.verifier)
                total += float(group.rewards.sum()) if group.rewards is not None else 0.0
                count += group.size
                right += sum(group.correct)
                tokens += float(group.response_mask.sum())
                raised += sum(1 for r in group.reasons if r.startswith("verifier raised"))
                failed += sum(1 for f in group.failures if f)
                truncated += sum(group.truncated)
                if out is not None:
                    out.put(group, version=item.meta.version, weight=1.0)
        n = max(count, 1.0)
        return {
            "reward/mean": total / n,
            "reward/accuracy": right / n,
            "reward/samples": count,
            "reward/verifier_errors": raised,
            "reward/failed_samples": failed,
            "rollout/truncated_fraction": truncated / n,
            "rollout/response_length": tokens / n,
            **pulls.metrics("reward"),
            "time/reward": time.perf_counter() - start,
        }
