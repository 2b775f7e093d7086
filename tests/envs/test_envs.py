"""Every env adapter passes check_env; focused tests for auto-reset, metrics, chunks and reset groups."""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from typing import Any

import gymnasium as gym
import numpy as np
import pytest

from rlinf.config import load_config
from rlinf.envs import (
    ActionChunk,
    AutoReset,
    EnvCheckError,
    EnvConfig,
    GymVectorEnv,
    ResetGroups,
    StepResult,
    VectorEnv,
    check_env,
    make_env,
)
from rlinf.errors import ConfigError

# ManiSkill 3.0.1 calls np.isnan on torch tensors, which numpy 2 flags as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

HAS_MUJOCO = importlib.util.find_spec("mujoco") is not None


@functools.cache
def maniskill_skip_reason() -> str | None:
    if importlib.util.find_spec("mani_skill") is None:
        return "mani_skill is not installed (pip install -c constraints.txt mani-skill==3.0.1)"
    from rlinf.envs.maniskill_env import vulkan_problem

    return vulkan_problem("cpu")


def needs_maniskill() -> None:
    reason = maniskill_skip_reason()
    if reason is not None:
        pytest.skip(reason)


def maniskill(num_envs: int = 1, **kw: Any) -> EnvConfig:
    return EnvConfig(kind="maniskill", id="PushCube-v1", num_envs=num_envs, **kw)


# (config, steps, fixed action for every env or None for random actions)
ADAPTERS: dict[str, tuple[EnvConfig, int, Any]] = {
    "gym-CartPole-v1": (EnvConfig(id="CartPole-v1", num_envs=4), 120, None),
    "gym-CartPole-v1-next_step": (EnvConfig(id="CartPole-v1", num_envs=4, auto_reset=AutoReset.NEXT_STEP), 120, None),
    "gym-Pendulum-v1": (EnvConfig(id="Pendulum-v1", num_envs=3, max_episode_steps=25), 60, None),
    "gym-HalfCheetah-v5": (EnvConfig(id="HalfCheetah-v5", num_envs=2, max_episode_steps=10), 30, None),
    "chunk4-CartPole-v1": (EnvConfig(id="CartPole-v1", num_envs=4, action_chunk=4), 40, None),
    "chunk3-Pendulum-v1": (EnvConfig(id="Pendulum-v1", num_envs=2, action_chunk=3, max_episode_steps=10), 20, None),
    "maniskill-PushCube-v1-state": (maniskill(1, max_episode_steps=15), 40, None),
    "maniskill-PushCube-v1-state-process2": (maniskill(2, vectorization="process", max_episode_steps=15), 40, None),
    "maniskill-PushCube-v1-rgb": (maniskill(1, obs_mode="rgb", max_episode_steps=4), 10, None),
}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_check_env(name: str) -> None:
    cfg, steps, _ = ADAPTERS[name]
    if cfg.kind == "maniskill":
        needs_maniskill()
    if "HalfCheetah" in cfg.id and not HAS_MUJOCO:
        pytest.skip("mujoco is not installed (pip install -c constraints.txt 'gymnasium[mujoco]')")
    env = make_env(cfg)
    assert isinstance(env, VectorEnv)
    report = check_env(env, steps=steps, seed=3)
    assert report.episodes > 0, f"{name}: no episode ended in {steps} steps, so auto-reset went unchecked"


# -- auto-reset --------------------------------------------------------------------------------------


def reference_episode(env_id: str, seed: int, action: int) -> tuple[list[np.ndarray], np.ndarray]:
    """One gymnasium env under a constant action: the observations of its first episode (reset obs
    first, terminal obs last) and the first observation of the next episode."""
    env = gym.make(env_id)
    obs, _ = env.reset(seed=seed)
    trajectory = [obs]
    while True:
        obs, _, term, trunc, _ = env.step(action)
        trajectory.append(obs)
        if term or trunc:
            break
    nxt, _ = env.reset()
    env.close()
    return trajectory, nxt


def test_same_step_returns_reset_obs_and_final_obs() -> None:
    traj, nxt = reference_episode("CartPole-v1", seed=11, action=0)
    env = GymVectorEnv("CartPole-v1", 2)
    obs, _ = env.reset(seed=[11, 11])
    np.testing.assert_array_equal(obs[0], traj[0])
    for t in range(1, len(traj)):
        res = env.step(np.zeros(2, dtype=np.int64))
        done = t == len(traj) - 1
        assert res.terminated.tolist() == [done, done]
        if done:
            np.testing.assert_array_equal(res.info["final_obs"][0], traj[-1])
            np.testing.assert_array_equal(res.obs[0], nxt)
        else:
            np.testing.assert_array_equal(res.obs[0], traj[t])
            np.testing.assert_array_equal(res.info["final_obs"], res.obs)
    env.close()


def test_next_step_returns_terminal_obs_then_resets() -> None:
    traj, nxt = reference_episode("CartPole-v1", seed=5, action=1)
    env = GymVectorEnv("CartPole-v1", 1, auto_reset=AutoReset.NEXT_STEP)
    env.reset(seed=5)
    for _ in range(len(traj) - 1):
        res = env.step(np.ones(1, dtype=np.int64))
    assert "final_obs" not in res.info
    assert res.terminated[0] and res.info["episode"]["mask"][0]
    np.testing.assert_array_equal(res.obs[0], traj[-1])
    res = env.step(np.ones(1, dtype=np.int64))  # the reset step: action ignored
    np.testing.assert_array_equal(res.obs[0], nxt)
    assert res.reward[0] == 0.0 and not res.terminated[0] and not res.truncated[0]
    assert not res.info["episode"]["mask"][0]
    env.close()


# -- episode metrics ---------------------------------------------------------------------------------


def test_cartpole_return_equals_length_under_fixed_actions() -> None:
    n, steps = 4, 200
    env = GymVectorEnv("CartPole-v1", n)
    env.reset(seed=0)
    pattern = np.array([0, 0, 1, 0, 1, 1, 1, 0])
    lengths: list[int] = []
    for t in range(steps):
        res = env.step(np.full(n, pattern[t % len(pattern)]))
        ep = res.info["episode"]
        assert ep["mask"].tolist() == (res.terminated | res.truncated).tolist()
        for i in np.flatnonzero(ep["mask"]):
            assert ep["return"][i] == float(ep["length"][i])
            lengths.append(int(ep["length"][i]))
    assert len(lengths) >= n and "success" not in ep
    env.close()


def test_truncation_metrics_and_bootstrap_obs() -> None:
    env = GymVectorEnv("Pendulum-v1", 3, max_episode_steps=7)
    env.reset(seed=1)
    rewards = np.zeros(3)
    for t in range(1, 15):
        res = env.step(np.zeros((3, 1), dtype=np.float32))
        rewards += res.reward
        ep = res.info["episode"]
        if t % 7 == 0:
            assert res.truncated.all() and not res.terminated.any()
            assert ep["length"].tolist() == [7, 7, 7]
            np.testing.assert_allclose(ep["return"], rewards, rtol=1e-5)
            assert not np.array_equal(res.info["final_obs"], res.obs)
            rewards[:] = 0
        else:
            assert not ep["mask"].any() and not ep["length"].any()
    env.close()


# -- action chunks -----------------------------------------------------------------------------------


def test_action_chunk_sums_rewards_and_stops_at_episode_end() -> None:
    traj, nxt = reference_episode("CartPole-v1", seed=2, action=0)
    episode_len = len(traj) - 1
    k = 4
    env = ActionChunk(GymVectorEnv("CartPole-v1", 1), k)
    assert env.action_space == gym.spaces.MultiDiscrete([2] * k)
    env.reset(seed=2)
    executed = 0
    chunks = 0
    while True:
        res = env.step(np.zeros((1, k), dtype=np.int64))
        chunks += 1
        steps = int(res.info["chunk_steps"][0])
        assert res.reward[0] == steps  # CartPole pays 1 per executed sub-step
        executed += steps
        if res.terminated[0]:
            break
        assert steps == k
    assert executed == episode_len
    assert steps == episode_len - k * (chunks - 1)  # the last chunk stopped at the episode end
    np.testing.assert_array_equal(res.info["final_obs"][0], traj[-1])
    np.testing.assert_array_equal(res.obs[0], nxt)  # the next episode starts from its reset state
    ep = res.info["episode"]
    assert ep["mask"][0] and ep["length"][0] == chunks and ep["return"][0] == episode_len
    env.close()


def test_action_chunk_stops_every_env_when_one_finishes() -> None:
    env = ActionChunk(GymVectorEnv("CartPole-v1", 2), 5)
    env.reset(seed=[2, 9])
    # Env 0 pushes one way and falls early; env 1 alternates and lasts longer.
    act = np.stack([np.zeros(5, dtype=np.int64), np.array([0, 1, 0, 1, 0])])
    while True:
        res = env.step(act)
        if res.terminated.any():
            break
    steps = res.info["chunk_steps"]
    assert steps[0] == steps[1] and res.reward.tolist() == [float(steps[0])] * 2
    assert res.terminated.tolist() == [True, False]
    env.close()


def test_action_chunk_shapes_and_errors() -> None:
    env = ActionChunk(GymVectorEnv("Pendulum-v1", 2), 3)
    assert env.action_space.shape == (3, 1)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected \(2, 3, 1\)"):
        env.step(np.zeros((2, 1), dtype=np.float32))
    env.close()
    with pytest.raises(ValueError, match="SAME_STEP"):
        ActionChunk(GymVectorEnv("CartPole-v1", 1, auto_reset=AutoReset.NEXT_STEP), 2)
    with pytest.raises(ValueError, match="k=0"):
        ActionChunk(GymVectorEnv("CartPole-v1", 1), 0)


# -- reset groups ------------------------------------------------------------------------------------


def rows(obs: Any, i: int) -> Any:
    return {k: v[i] for k, v in obs.items()} if isinstance(obs, dict) else obs[i]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return all(np.array_equal(a[k], b[k]) for k in a)
    return bool(np.array_equal(a, b))


def assert_groups(obs: Any, groups: ResetGroups) -> None:
    ids = groups.group_ids
    for i in range(groups.num_envs):
        for j in range(groups.num_envs):
            assert same(rows(obs, i), rows(obs, j)) == (ids[i] == ids[j]), (i, j)


def test_reset_groups_start_identical_within_and_differ_across() -> None:
    groups = ResetGroups(num_envs=6, group_size=3, seed=10)
    assert groups.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert groups.seeds(0) == [10, 10, 10, 11, 11, 11] and groups.seeds(1) == [12, 12, 12, 13, 13, 13]
    env = GymVectorEnv("CartPole-v1", 6)
    obs0, _ = groups.reset(env, round=0)
    assert_groups(obs0, groups)
    # Same actions within a group keep the group's envs in lock step.
    for _ in range(5):
        res = env.step(np.repeat(np.array([0, 1]), 3))
    assert same(res.obs[0], res.obs[2]) and not same(res.obs[0], res.obs[3])
    obs1, _ = groups.reset(env, round=1)
    assert_groups(obs1, groups)
    assert not same(obs1[0], obs0[0]) and not same(obs1[3], obs0[3])
    with pytest.raises(ValueError, match="num_envs=6"):
        ResetGroups(num_envs=4, group_size=2).reset(env)
    env.close()
    with pytest.raises(ValueError, match="Try num_envs=6"):
        ResetGroups(num_envs=7, group_size=3)


def test_maniskill_reset_groups_and_success() -> None:
    needs_maniskill()
    cfg = maniskill(4, group_size=2, seed=5, max_episode_steps=5)
    env = make_env(cfg)
    obs, _ = cfg.reset_groups.reset(env)
    assert_groups(obs, cfg.reset_groups)
    for _ in range(5):
        res = env.step(np.zeros((4, *env.action_space.shape), dtype=np.float32))
    ep = res.info["episode"]
    assert ep["mask"].all() and ep["length"].tolist() == [5] * 4
    assert ep["success"].dtype == np.bool_ and ep["success"].shape == (4,)
    env.close()
    env.close()


# -- the checker catches violations ------------------------------------------------------------------


class Broken:
    """A CartPole adapter with one contract violation, selected by ``fault``."""

    def __init__(self, fault: str) -> None:
        self.inner = GymVectorEnv("CartPole-v1", 2)
        self.fault = fault
        self.closed = False

    def __repr__(self) -> str:
        return f"Broken({self.fault})"

    num_envs = property(lambda self: 2)
    observation_space = property(lambda self: self.inner.observation_space)
    action_space = property(lambda self: self.inner.action_space)

    @property
    def auto_reset(self) -> AutoReset:
        return AutoReset.NEXT_STEP if self.fault == "mode" else AutoReset.SAME_STEP

    def reset(self, *, seed: Any = None, options: Any = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.inner.reset(seed=seed)
        if self.fault == "seed":
            obs = obs + np.random.default_rng().uniform(0, 1e-3, size=obs.shape).astype(np.float32)
        return obs, info

    def step(self, actions: np.ndarray) -> StepResult:
        obs, reward, term, trunc, info = self.inner.step(actions)
        if self.fault == "dtype":
            reward = reward.astype(np.float64)
        if self.fault == "return" and info["episode"]["mask"].any():
            info["episode"]["return"] = info["episode"]["return"] + 1.0
        return StepResult(obs, reward, term, trunc, info)

    def close(self) -> None:
        if self.fault == "close" and self.closed:
            raise RuntimeError("already closed")
        self.closed = True


@pytest.mark.parametrize(
    ("fault", "match"),
    [
        ("dtype", r"Broken\(dtype\).*step 0 reward.*float32"),
        ("mode", r"Broken\(mode\).*'final_obs' present; NEXT_STEP"),
        ("seed", r"Broken\(seed\).*same seed gave different"),
        ("return", r"Broken\(return\).*info\['episode'\]\['return'\]"),
        ("close", r"Broken\(close\).*close\(\)"),
    ],
)
def test_check_env_names_the_adapter_field_and_rule(fault: str, match: str) -> None:
    with pytest.raises(EnvCheckError, match=match):
        check_env(Broken(fault), steps=80)


# -- adapters and config -----------------------------------------------------------------------------


def test_gym_adapter_errors() -> None:
    with pytest.raises(ValueError, match="Did you mean 'CartPole-v1'"):
        GymVectorEnv("CartPole-v9", 2)
    env = GymVectorEnv("CartPole-v1", 2)
    with pytest.raises(RuntimeError, match="before reset"):
        env.step(np.zeros(2, dtype=np.int64))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="3 seeds for 2 envs"):
        env.reset(seed=[1, 2, 3])
    env.close()
    with pytest.raises(RuntimeError, match="after close"):
        env.reset()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "gymm"}, "Did you mean 'gym'"),
        ({"num_envs": 0}, "num_envs=0 must be"),
        ({"num_envs": 6, "group_size": 4}, "Try env.num_envs=4"),
        ({"obs_mode": "rgb"}, "obs_mode='rgb' is not available for kind='gym'"),
        ({"auto_reset": "next_step", "action_chunk": 2}, "Set env.auto_reset=same_step"),
        ({"kind": "maniskill", "auto_reset": "next_step"}, "not implemented for ManiSkill"),
        ({"auto_reset": "later"}, "'later' is not one of"),
    ],
)
def test_env_config_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EnvConfig(**kwargs)


def test_env_config_from_overrides() -> None:
    cfg = load_config(EnvConfig, overrides=["id=Pendulum-v1", "num_envs=4", "auto_reset=next_step"])
    assert cfg.auto_reset is AutoReset.NEXT_STEP and cfg.num_envs == 4
    env = make_env(cfg)
    assert isinstance(env, GymVectorEnv) and env.auto_reset is AutoReset.NEXT_STEP
    env.close()
    chunked = make_env(EnvConfig(num_envs=2, action_chunk=3))
    assert isinstance(chunked, ActionChunk) and chunked.action_space.shape == (3,)
    chunked.close()


def test_import_does_not_import_mani_skill() -> None:
    code = "import sys, rlinf.envs; assert 'mani_skill' not in sys.modules and 'sapien' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
