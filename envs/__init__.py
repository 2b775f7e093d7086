"""rlinf.envs: batched environments behind one protocol, a conformance checker, and adapters.

``VectorEnv`` (in ``vector_env.py``) is the contract; ``check_env`` verifies it; ``make_env`` builds
an adapter from an ``EnvConfig``. Importing this package does not import mani_skill: the ManiSkill
adapter imports it when an env is built.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

from rlinf.envs.check import CheckReport, EnvCheckError, check_env
from rlinf.envs.gym_env import GymVectorEnv
from rlinf.envs.maniskill_env import ManiSkillVectorEnv
from rlinf.envs.reset_groups import ResetGroups
from rlinf.envs.vector_env import AutoReset, EpisodeTracker, Obs, Seed, StepResult, VectorEnv
from rlinf.envs.wrappers import ActionChunk
from rlinf.errors import ConfigError

__all__ = [
    "ActionChunk",
    "AutoReset",
    "CheckReport",
    "EnvCheckError",
    "EnvConfig",
    "EpisodeTracker",
    "GymVectorEnv",
    "ManiSkillVectorEnv",
    "Obs",
    "ResetGroups",
    "Seed",
    "StepResult",
    "VectorEnv",
    "check_env",
    "make_env",
]

_KINDS = ("gym", "maniskill")


@dataclass(frozen=True)
class EnvConfig:
    """Which env to build and how it is batched.

    Args:
        kind: ``"gym"`` (any gymnasium id) or ``"maniskill"`` (ManiSkill 3).
        id: the env id, e.g. ``"CartPole-v1"`` or ``"PushCube-v1"``.
        num_envs: ``N``, envs stepped together.
        obs_mode: ``"state"``; ``"rgb"`` adds camera images (ManiSkill only).
        action_chunk: low-level actions per policy action (``ActionChunk`` when > 1).
        seed: base seed the env worker passes to ``reset`` (and of the reset groups).
        auto_reset: ``AutoReset.SAME_STEP`` or ``AutoReset.NEXT_STEP`` (gym only).
        group_size: envs per GRPO reset group (``num_envs`` must be a multiple); 1 means no groups.
        max_episode_steps: overrides the task's time limit.
        sim_backend: ManiSkill physics, ``"cpu"`` or ``"gpu"`` (CUDA).
        vectorization: ManiSkill CPU envs in this process (``"loop"``) or one process each (``"process"``).
        control_mode: ManiSkill controller; None keeps the task's default.
        ignore_terminations: ManiSkill: success does not end an episode; episodes run to the time limit.
    """

    kind: Literal["gym", "maniskill"] = "gym"
    id: str = "CartPole-v1"
    num_envs: int = 1
    obs_mode: Literal["state", "rgb"] = "state"
    action_chunk: int = 1
    seed: int = 0
    auto_reset: AutoReset = AutoReset.SAME_STEP
    group_size: int = 1
    max_episode_steps: int | None = None
    sim_backend: Literal["cpu", "gpu"] = "cpu"
    vectorization: Literal["loop", "process"] = "loop"
    control_mode: str | None = None
    ignore_terminations: bool = False

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            near = difflib.get_close_matches(str(self.kind), _KINDS, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"env.kind={self.kind!r} is not one of {list(_KINDS)}.{hint}")
        if not isinstance(self.id, str) or not self.id:
            raise ConfigError(f"env.id={self.id!r} must name an env, e.g. 'CartPole-v1' or 'PushCube-v1'.")
        for name in ("num_envs", "action_chunk", "group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"env.{name}={value!r} must be an integer >= 1.")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ConfigError(f"env.max_episode_steps={self.max_episode_steps} must be >= 1, or null for the task's.")
        if self.num_envs % self.group_size:
            fix = max(self.group_size, self.num_envs - self.num_envs % self.group_size)
            raise ConfigError(
                f"env.num_envs={self.num_envs} is not a multiple of env.group_size={self.group_size}; each reset "
                f"group needs group_size envs. Try env.num_envs={fix}."
            )
        if isinstance(self.auto_reset, str):  # a plain string from Python code
            try:
                object.__setattr__(self, "auto_reset", AutoReset(self.auto_reset))
            except ValueError:
                raise ConfigError(
                    f"env.auto_reset={self.auto_reset!r} is not one of {[m.value for m in AutoReset]}."
                ) from None
        if not isinstance(self.auto_reset, AutoReset):
            raise ConfigError(f"env.auto_reset={self.auto_reset!r} is not one of {[m.value for m in AutoReset]}.")
        if self.auto_reset is AutoReset.NEXT_STEP and self.action_chunk > 1:
            raise ConfigError(
                "env.auto_reset=next_step cannot be combined with env.action_chunk > 1: chunks keep a finished "
                "env's terminal observation only under same-step reset. Set env.auto_reset=same_step."
            )
        if self.kind == "gym":
            if self.obs_mode != "state":
                raise ConfigError(
                    f"env.obs_mode={self.obs_mode!r} is not available for kind='gym'; gym envs return their own "
                    f"observation space. Set env.obs_mode=state."
                )
            if self.sim_backend != "cpu":
                raise ConfigError(f"env.sim_backend={self.sim_backend!r} applies to ManiSkill only; leave it 'cpu'.")
        else:
            if self.obs_mode not in ("state", "rgb"):
                raise ConfigError(f"env.obs_mode={self.obs_mode!r} is not one of ['state', 'rgb'].")
            if self.sim_backend not in ("cpu", "gpu"):
                raise ConfigError(f"env.sim_backend={self.sim_backend!r} is not one of ['cpu', 'gpu'].")
            if self.vectorization not in ("loop", "process"):
                raise ConfigError(f"env.vectorization={self.vectorization!r} is not one of ['loop', 'process'].")
            if self.auto_reset is not AutoReset.SAME_STEP:
                raise ConfigError(
                    "env.auto_reset=next_step is not implemented for ManiSkill; set env.auto_reset=same_step."
                )

    @property
    def reset_groups(self) -> ResetGroups:
        """The GRPO reset groups (``group_size`` envs per shared starting state)."""
        return ResetGroups(self.num_envs, self.group_size, self.seed)


def make_env(cfg: EnvConfig) -> VectorEnv:
    """Builds the env ``cfg`` describes (not yet reset: reset it with ``cfg.seed`` or ``cfg.reset_groups``)."""
    env: VectorEnv
    if cfg.kind == "gym":
        env = GymVectorEnv(cfg.id, cfg.num_envs, auto_reset=cfg.auto_reset, max_episode_steps=cfg.max_episode_steps)
    else:
        env = ManiSkillVectorEnv(
            cfg.id,
            cfg.num_envs,
            obs_mode=cfg.obs_mode,
            sim_backend=cfg.sim_backend,
            vectorization=cfg.vectorization,
            control_mode=cfg.control_mode,
            max_episode_steps=cfg.max_episode_steps,
            ignore_terminations=cfg.ignore_terminations,
        )
    if cfg.action_chunk > 1:
        env = ActionChunk(env, cfg.action_chunk)
    return env
