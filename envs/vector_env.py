"""The batched environment protocol every adapter in ``rlinf.envs`` implements.

A ``VectorEnv`` steps ``N = num_envs`` independent copies of one task in lock step. Everything it
returns is batched along a leading axis of size ``N``:

- **obs**: a numpy array ``[N, *observation_space.shape]`` of ``observation_space.dtype``, or, when
  ``observation_space`` is a ``gymnasium.spaces.Dict``, a ``dict`` with the same keys mapping to
  such arrays (one level deep).
- **reward**: ``float32 [N]``; **terminated** / **truncated**: ``bool [N]``. ``terminated`` means the
  task reached a terminal state (do not bootstrap); ``truncated`` means the episode was cut (time
  limit: bootstrap from the final observation).
- **actions** passed to ``step``: ``[N, *action_space.shape]`` (``int64 [N]`` for ``Discrete``).
- ``observation_space`` / ``action_space`` describe **one** env, not the batch.

Seeding: ``reset(seed=s)`` with an int seeds env ``i`` with ``s + i``; a sequence of ``N`` ints seeds
each env with its own value, so envs given equal seeds start from identical states (what GRPO reset
groups build on); ``seed=None`` keeps the envs' random streams. The same seed gives the same first
observation. Auto-resets after a seeded ``reset`` continue each env's stream, so a whole rollout is
reproducible.

Auto-reset (``env.auto_reset``), which every adapter declares and honours:

- ``AutoReset.SAME_STEP`` (the default, what PPO needs): when env ``i`` ends an episode in ``step``,
  it is reset within the same call. The returned ``obs[i]`` is already the first observation of the
  next episode, ``terminated[i]`` / ``truncated[i]`` say how the old one ended, and
  ``info["final_obs"]`` holds the old episode's last observation. ``info["final_obs"]`` is present on
  every step with the same structure as ``obs``; rows of envs that did not finish equal ``obs`` (it
  may be the very same object as ``obs`` when no env finished: treat both as read-only). Bootstrap a
  truncated episode from ``value(info["final_obs"])``.
- ``AutoReset.NEXT_STEP`` (gymnasium 1.x's default): the step that ends an episode returns its last
  observation; the *next* ``step`` call ignores env ``i``'s action, resets it and returns the first
  observation with ``reward[i] = 0`` and ``terminated[i] = truncated[i] = False``. That reset step
  does not count towards any episode. ``info["final_obs"]`` is absent.

Episode metrics: on every step ``info["episode"]`` is a dict of ``[N]`` arrays describing the
episodes that ended at this step:

- ``"mask"``: ``bool``, ``terminated | truncated``: which envs finished an episode now.
- ``"return"``: ``float32``, the undiscounted sum of the finished episode's rewards (0 where not mask).
- ``"length"``: ``int32``, how many ``step`` calls the finished episode took (0 where not mask).
- ``"success"``: ``bool``, only for envs that report success: whether success was reported at any
  step of the finished episode (False where not mask).

``close()`` releases simulators and worker processes and may be called any number of times.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, TypeAlias, runtime_checkable

import gymnasium as gym
import numpy as np

Obs: TypeAlias = np.ndarray | dict[str, np.ndarray]
"""A batch of observations: ``[N, ...]`` array, or a dict of such arrays."""

Seed: TypeAlias = int | Sequence[int] | None
"""``reset`` seeds: one int (env ``i`` gets ``seed + i``), ``N`` ints (one per env), or None."""


class AutoReset(enum.Enum):
    """When an env that finished an episode is reset; see the module docstring for the contract."""

    SAME_STEP = "same_step"
    NEXT_STEP = "next_step"


class StepResult(NamedTuple):
    """What ``VectorEnv.step`` returns; unpacks like gymnasium's five-tuple.

    Args:
        obs: ``[N, ...]`` array or dict of arrays (after auto-reset under ``SAME_STEP``).
        reward: ``float32 [N]``.
        terminated: ``bool [N]``, the task reached a terminal state.
        truncated: ``bool [N]``, the episode was cut (time limit).
        info: ``"episode"`` metrics on every step, ``"final_obs"`` under ``SAME_STEP``, adapter extras.
    """

    obs: Obs
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    info: dict[str, Any]


@runtime_checkable
class VectorEnv(Protocol):
    """``num_envs`` copies of one environment stepped together; the module docstring is the contract."""

    @property
    def num_envs(self) -> int:
        """How many envs are stepped together (``N``)."""
        ...

    @property
    def observation_space(self) -> gym.Space[Any]:
        """The observation space of one env."""
        ...

    @property
    def action_space(self) -> gym.Space[Any]:
        """The action space of one env."""
        ...

    @property
    def auto_reset(self) -> AutoReset:
        """The auto-reset mode this env honours."""
        ...

    def reset(self, *, seed: Seed = None, options: dict[str, Any] | None = None) -> tuple[Obs, dict[str, Any]]:
        """Resets every env; returns the first observations and an info dict."""
        ...

    def step(self, actions: np.ndarray) -> StepResult:
        """Applies ``actions [N, *action_space.shape]`` to every env."""
        ...

    def close(self) -> None:
        """Releases resources; idempotent."""
        ...


def seeds_for(seed: Seed, num_envs: int, where: str) -> list[int | None]:
    """Expands a ``reset`` seed into one seed (or None) per env.

    Args:
        seed: None, an int (env ``i`` gets ``seed + i``) or ``num_envs`` ints.
        num_envs: ``N``.
        where: the adapter's name, for error messages.
    """
    if seed is None:
        return [None] * num_envs
    if isinstance(seed, int | np.integer):
        return [int(seed) + i for i in range(num_envs)]
    if isinstance(seed, str | bytes) or not isinstance(seed, Sequence | np.ndarray):
        raise ValueError(
            f"{where}: reset(seed={seed!r}) is not supported; pass None, an int, or a list of {num_envs} ints."
        )
    seeds = [int(s) for s in seed]
    if len(seeds) != num_envs:
        raise ValueError(
            f"{where}: reset got {len(seeds)} seeds for {num_envs} envs; pass exactly one seed per env or a single int."
        )
    return list(seeds)


def check_actions(actions: Any, space: gym.Space[Any], num_envs: int, where: str) -> np.ndarray:
    """Returns ``actions`` as an array of shape ``[N, *space.shape]`` or raises a ``ValueError``.

    Args:
        actions: the batch passed to ``step``.
        space: the action space of one env.
        num_envs: ``N``.
        where: the adapter's name, for error messages.
    """
    arr = np.asarray(actions)
    expected = (num_envs, *(space.shape or ()))
    if arr.shape != expected:
        raise ValueError(
            f"{where}: step got actions of shape {arr.shape}; expected {expected} "
            f"(num_envs first, then the action space's shape {space.shape}). Batch one action per env."
        )
    return arr


def select_obs(mask: np.ndarray, if_true: Obs, if_false: Obs) -> Obs:
    """Row-wise ``where``: rows of ``if_true`` where ``mask [N]`` holds, else rows of ``if_false``."""
    if isinstance(if_true, dict) and isinstance(if_false, dict):
        return {k: _select_rows(mask, v, if_false[k]) for k, v in if_true.items()}
    if isinstance(if_true, np.ndarray) and isinstance(if_false, np.ndarray):
        return _select_rows(mask, if_true, if_false)
    raise TypeError("select_obs: both observations must be dicts or both arrays")


def _select_rows(mask: np.ndarray, if_true: np.ndarray, if_false: np.ndarray) -> np.ndarray:
    shape = (len(mask),) + (1,) * (if_true.ndim - 1)
    return np.where(mask.reshape(shape), if_true, if_false)


def stack_obs(rows: Sequence[Any]) -> Obs:
    """Stacks per-env observations (arrays, or dicts of arrays) into one batch."""
    first = rows[0]
    if isinstance(first, Mapping):
        return {k: np.stack([r[k] for r in rows]) for k in first}
    return np.stack(rows)


class EpisodeTracker:
    """Per-env running return, length and success; emits ``info["episode"]`` as documented above.

    Args:
        num_envs: ``N``.
        track_success: whether the env reports success (adds ``"success"`` to the metrics).
    """

    def __init__(self, num_envs: int, track_success: bool) -> None:
        self.num_envs = num_envs
        self.track_success = track_success
        self._return = np.zeros(num_envs, dtype=np.float64)
        self._length = np.zeros(num_envs, dtype=np.int64)
        self._success = np.zeros(num_envs, dtype=bool)

    def reset(self) -> None:
        """Forgets every running episode (call from ``reset``)."""
        self._return[:] = 0.0
        self._length[:] = 0
        self._success[:] = False

    def step(
        self,
        reward: np.ndarray,
        done: np.ndarray,
        success: np.ndarray | None = None,
        counted: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Adds one step and returns the metrics of the episodes that ended at it.

        Args:
            reward: ``float32 [N]``.
            done: ``bool [N]``, ``terminated | truncated``.
            success: ``bool [N]`` success reported at this step, or None.
            counted: ``bool [N]``, which envs took a real step (False for ``NEXT_STEP`` reset steps).
        """
        if counted is None:
            self._return += reward
            self._length += 1
        else:
            self._return += np.where(counted, reward, 0.0)
            self._length += counted
        if success is not None:
            self._success |= success if counted is None else success & counted
        out: dict[str, np.ndarray] = {
            "mask": done.copy(),
            "return": np.where(done, self._return, 0.0).astype(np.float32),
            "length": np.where(done, self._length, 0).astype(np.int32),
        }
        if self.track_success:
            out["success"] = done & self._success
        self._return[done] = 0.0
        self._length[done] = 0
        self._success[done] = False
        return out
