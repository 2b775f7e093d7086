"""Reset groups for GRPO: ``group_size`` envs in a row start every round from the same initial state.

GRPO compares several rollouts from one starting point. With seeded envs that is a matter of seeds:
envs ``[g * j, g * (j + 1))`` form group ``j`` and all get the seed ``seed + round * num_groups + j``,
so the envs of a group start identically, different groups (and rounds) start differently, and a run
is reproducible. Auto-reset after an episode ends draws a fresh state per env, so a group is only
identical within its first episode: reset the env with the next round's seeds before each GRPO round
(fixed-horizon rollouts do this naturally).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rlinf.envs.vector_env import Obs, VectorEnv


@dataclass(frozen=True)
class ResetGroups:
    """Which envs share a starting state, and the seeds that make them share it.

    Args:
        num_envs: ``N``, a multiple of ``group_size``.
        group_size: ``g``, envs per group (GRPO's samples per prompt).
        seed: base seed; round ``r`` uses seeds ``seed + r * num_groups + j`` for groups ``j``.
    """

    num_envs: int
    group_size: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"ResetGroups: group_size={self.group_size!r} must be an int >= 1.")
        if not isinstance(self.num_envs, int) or self.num_envs < 1 or self.num_envs % self.group_size:
            fix = max(self.group_size, self.num_envs - self.num_envs % self.group_size) if self.num_envs else 0
            raise ValueError(
                f"ResetGroups: num_envs={self.num_envs!r} is not a positive multiple of group_size={self.group_size}; "
                f"every group needs group_size envs. Try num_envs={fix}."
            )

    @property
    def num_groups(self) -> int:
        return self.num_envs // self.group_size

    @property
    def group_ids(self) -> np.ndarray:
        """``int64 [N]``: the group of each env (``[0, 0, ..., 1, 1, ...]``)."""
        return np.repeat(np.arange(self.num_groups), self.group_size)

    def seeds(self, round: int = 0) -> list[int]:
        """The ``N`` per-env seeds of ``round``: equal within a group, distinct across groups and rounds."""
        if round < 0:
            raise ValueError(f"ResetGroups.seeds: round={round} must be >= 0.")
        base = self.seed + round * self.num_groups
        return [base + int(j) for j in self.group_ids]

    def reset(self, env: VectorEnv, round: int = 0) -> tuple[Obs, dict[str, Any]]:
        """Resets ``env`` so that each group starts from one shared state; returns ``env.reset``'s result."""
        if env.num_envs != self.num_envs:
            raise ValueError(
                f"ResetGroups.reset: {env!r} has num_envs={env.num_envs} but the groups cover "
                f"num_envs={self.num_envs}; build ResetGroups(num_envs={env.num_envs}, group_size={self.group_size})."
            )
        return env.reset(seed=self.seeds(round))
