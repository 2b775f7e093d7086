"""Wrappers that change how a policy's actions map onto a ``VectorEnv``."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from rlinf.envs.vector_env import (
    AutoReset,
    EpisodeTracker,
    Obs,
    Seed,
    StepResult,
    VectorEnv,
    check_actions,
)


def chunk_space(space: gym.Space[Any], k: int) -> gym.Space[Any]:
    """The space of ``k`` consecutive actions from ``space`` (``Box`` -> ``Box [k, ...]``,
    ``Discrete(n)`` -> ``MultiDiscrete([n] * k)``)."""
    if isinstance(space, gym.spaces.Box):
        low = np.broadcast_to(space.low, (k, *space.shape))
        high = np.broadcast_to(space.high, (k, *space.shape))
        return gym.spaces.Box(low=low, high=high, dtype=space.dtype)
    if isinstance(space, gym.spaces.Discrete):
        return gym.spaces.MultiDiscrete(np.full(k, space.n), start=np.full(k, space.start), dtype=space.dtype)
    raise ValueError(
        f"ActionChunk: action space {space} is not supported; chunks are built from Box or Discrete action spaces."
    )


class ActionChunk:
    """Each policy action is ``k`` low-level actions executed one after another.

    ``step`` takes ``actions [N, k, *act]`` and runs up to ``k`` sub-steps of the wrapped env; the
    reward is the sum over the executed sub-steps. The wrapped env steps all its envs in lock step, so
    when any env ends an episode at sub-step ``j < k``, the chunk stops there **for every env**: the
    remaining sub-actions ``j+1 .. k-1`` of all envs are dropped, never executed, and the policy is
    asked again from the returned observations. No sub-action is ever executed in an episode other
    than the one it was planned for, so a finished env's next episode starts from its reset state.
    ``info["chunk_steps"]`` (``int32 [N]``) says how many sub-steps ran. Fixed-horizon tasks (no
    early termination) always run whole chunks.

    The wrapped env must auto-reset on the same step; this wrapper does too. Episode metrics count
    chunk steps: ``length`` is the number of ``step`` calls of this wrapper; ``return`` sums all
    executed sub-step rewards; ``success`` is taken from the wrapped env.

    Args:
        env: a ``VectorEnv`` with ``auto_reset == AutoReset.SAME_STEP``.
        k: sub-actions per policy action, ``>= 1``.
    """

    def __init__(self, env: VectorEnv, k: int) -> None:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"ActionChunk: k={k!r} must be an int >= 1 (sub-actions per policy action).")
        if env.auto_reset is not AutoReset.SAME_STEP:
            raise ValueError(
                f"ActionChunk({env!r}): the wrapped env auto-resets with {env.auto_reset}; chunks need "
                f"AutoReset.SAME_STEP so a finished env's terminal observation is kept. Build it with "
                f"auto_reset=AutoReset.SAME_STEP."
            )
        self.env = env
        self.k = k
        self._action_space = chunk_space(env.action_space, k)
        self._tracker = EpisodeTracker(env.num_envs, track_success=False)
        self._closed = False

    def __repr__(self) -> str:
        return f"ActionChunk({self.env!r}, k={self.k})"

    @property
    def num_envs(self) -> int:
        return self.env.num_envs

    @property
    def observation_space(self) -> gym.Space[Any]:
        return self.env.observation_space

    @property
    def action_space(self) -> gym.Space[Any]:
        return self._action_space

    @property
    def auto_reset(self) -> AutoReset:
        return AutoReset.SAME_STEP

    def reset(self, *, seed: Seed = None, options: dict[str, Any] | None = None) -> tuple[Obs, dict[str, Any]]:
        """Resets the wrapped env."""
        self._tracker.reset()
        return self.env.reset(seed=seed, options=options)

    def step(self, actions: np.ndarray) -> StepResult:
        """Runs up to ``k`` sub-steps with ``actions [N, k, *act]``; see the class docstring."""
        arr = check_actions(actions, self._action_space, self.num_envs, repr(self))
        n = self.num_envs
        reward = np.zeros(n, dtype=np.float32)
        success: np.ndarray | None = None
        executed = 0
        result: StepResult | None = None
        for j in range(self.k):
            result = self.env.step(arr[:, j])
            reward += result.reward
            executed += 1
            inner_ep = result.info["episode"]
            if "success" in inner_ep:
                success = inner_ep["success"] if success is None else success | inner_ep["success"]
            if np.any(result.terminated | result.truncated):
                break
        if result is None:  # unreachable: k >= 1
            raise RuntimeError(f"{self!r}: no sub-step ran")
        self._tracker.track_success = success is not None
        done = result.terminated | result.truncated
        info = dict(result.info)
        info["episode"] = self._tracker.step(reward, done, success)
        info["chunk_steps"] = np.full(n, executed, dtype=np.int32)
        return StepResult(result.obs, reward, result.terminated, result.truncated, info)

    def close(self) -> None:
        """Closes the wrapped env; safe to call again."""
        if not self._closed:
            self._closed = True
            self.env.close()
