"""``check_env``: the conformance checker every ``VectorEnv`` adapter passes in the tests.

It drives an env with random actions and checks the contract written in ``rlinf.envs.vector_env``:
shapes and dtypes, flags, the declared auto-reset mode, seeding, episode metrics and ``close``.
A violation raises ``EnvCheckError`` naming the adapter, the field and the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from rlinf.envs.vector_env import AutoReset, Obs, StepResult, VectorEnv

_RETURN_RTOL = 1e-4
_RETURN_ATOL = 1e-3


class EnvCheckError(ValueError):
    """An env broke the ``VectorEnv`` contract; the message names the adapter, the field and the rule."""


@dataclass(frozen=True)
class CheckReport:
    """What ``check_env`` exercised.

    Args:
        steps: ``step`` calls made after the determinism checks.
        episodes: episodes that ended during those steps (over all envs).
        terminated: how many of them ended with ``terminated``.
        truncated: how many of them ended with ``truncated`` only.
    """

    steps: int
    episodes: int
    terminated: int
    truncated: int


def check_env(env: VectorEnv, steps: int = 64, seed: int = 0, actions: np.ndarray | None = None) -> CheckReport:
    """Checks ``env`` against the ``VectorEnv`` contract, then closes it (twice, to check idempotence).

    Args:
        env: the env under test; it is reset, stepped and closed.
        steps: how many ``step`` calls to check.
        seed: base seed for resets and for sampling actions.
        actions: optional fixed actions ``[steps, N, *action_space.shape]`` instead of random ones
            (e.g. to force episodes to end within ``steps``).

    Raises:
        EnvCheckError: with the adapter, the field and the rule that was broken.
    """
    name = repr(env)
    checker = _Checker(env, name)
    checker.check_attributes()
    n = env.num_envs
    if actions is not None and (len(actions) < steps or np.asarray(actions[0]).shape[:1] != (n,)):
        raise ValueError(
            f"check_env({name}): actions must have at least steps={steps} rows of shape (num_envs={n}, ...); "
            f"got {len(actions)} rows of shape {np.asarray(actions[0]).shape}."
        )
    checker.check_seeding(seed)
    checker.check_bad_actions(seed)
    report = checker.run(steps, seed, actions)
    checker.check_close()
    return report


class _Checker:
    def __init__(self, env: VectorEnv, name: str) -> None:
        self.env = env
        self.name = name

    def fail(self, where: str, message: str) -> EnvCheckError:
        return EnvCheckError(f"check_env({self.name}): {where}: {message}")

    # -- static contract ---------------------------------------------------------------------------

    def check_attributes(self) -> None:
        env = self.env
        if not isinstance(env, VectorEnv):
            missing = [
                m
                for m in ("num_envs", "observation_space", "action_space", "auto_reset", "reset", "step", "close")
                if not hasattr(env, m)
            ]
            raise self.fail("protocol", f"missing {missing}; a VectorEnv defines all of them.")
        if not isinstance(env.num_envs, int) or env.num_envs < 1:
            raise self.fail("num_envs", f"{env.num_envs!r} must be an int >= 1.")
        for field in ("observation_space", "action_space"):
            space = getattr(env, field)
            if not isinstance(space, gym.Space):
                raise self.fail(field, f"{space!r} must be a gymnasium.Space describing one env.")
        if not isinstance(env.auto_reset, AutoReset):
            raise self.fail("auto_reset", f"{env.auto_reset!r} must be an AutoReset member.")

    # -- observations ------------------------------------------------------------------------------

    def check_obs(self, obs: Any, where: str, check_bounds: bool = False) -> None:
        space = self.env.observation_space
        if isinstance(space, gym.spaces.Dict):
            if not isinstance(obs, dict):
                raise self.fail(where, f"got {type(obs).__name__}; a Dict observation space needs a dict of arrays.")
            if set(obs) != set(space.spaces):
                raise self.fail(
                    where, f"keys {sorted(obs)} differ from the observation space's {sorted(space.spaces)}."
                )
            for key, sub in space.spaces.items():
                self._check_array(obs[key], sub, f"{where}[{key!r}]", check_bounds)
        else:
            self._check_array(obs, space, where, check_bounds)

    def _check_array(self, arr: Any, space: gym.Space[Any], where: str, check_bounds: bool) -> None:
        n = self.env.num_envs
        if not isinstance(arr, np.ndarray):
            raise self.fail(where, f"got {type(arr).__name__}; observations are numpy arrays [N, ...].")
        expected = (n, *(space.shape or ()))
        if arr.shape != expected:
            raise self.fail(where, f"shape {arr.shape} != {expected} (num_envs, *observation_space.shape).")
        if space.dtype is not None and arr.dtype != space.dtype:
            raise self.fail(where, f"dtype {arr.dtype} != observation_space dtype {space.dtype}.")
        if check_bounds:
            for i in range(n):
                if not space.contains(arr[i]):
                    raise self.fail(where, f"row {i} is outside the observation space {space}.")

    # -- seeding -----------------------------------------------------------------------------------

    def check_seeding(self, seed: int) -> None:
        env, n = self.env, self.env.num_envs
        obs, info = env.reset(seed=seed)
        self.check_obs(obs, "reset(seed) obs", check_bounds=True)
        if not isinstance(info, dict):
            raise self.fail("reset info", f"got {type(info).__name__}; reset returns (obs, dict).")
        again, _ = env.reset(seed=seed)
        if not _obs_equal(obs, again):
            raise self.fail("reset(seed) obs", "two resets with the same seed gave different observations.")
        same, _ = env.reset(seed=[seed] * n)
        self.check_obs(same, "reset(seed=[s] * N) obs")
        for i in range(1, n):
            if not _obs_equal(_row(same, i), _row(same, 0)):
                raise self.fail(
                    "reset(seed=[s] * N) obs",
                    f"env {i} differs from env 0; envs given equal seeds must start from identical states.",
                )

    def check_bad_actions(self, seed: int) -> None:
        env = self.env
        env.reset(seed=seed)
        bad = np.zeros((env.num_envs + 1, *(env.action_space.shape or ())), dtype=env.action_space.dtype)
        try:
            env.step(bad)
        except ValueError:
            return
        except Exception as exc:
            raise self.fail(
                "step(actions)",
                f"actions with num_envs + 1 rows raised {type(exc).__name__}: {exc}; "
                f"raise ValueError naming the shape.",
            ) from exc
        raise self.fail("step(actions)", "actions with num_envs + 1 rows were accepted; raise ValueError instead.")

    # -- stepping ----------------------------------------------------------------------------------

    def run(self, steps: int, seed: int, fixed: np.ndarray | None) -> CheckReport:
        env, n = self.env, self.env.num_envs
        env.action_space.seed(seed)
        env.reset(seed=seed)
        same_step = env.auto_reset is AutoReset.SAME_STEP
        ret = np.zeros(n, dtype=np.float64)
        length = np.zeros(n, dtype=np.int64)
        prev_done = np.zeros(n, dtype=bool)
        has_success: bool | None = None
        episodes = n_term = n_trunc = 0
        for t in range(steps):
            acts = np.asarray(fixed[t]) if fixed is not None else _sample(env.action_space, n)
            result = env.step(acts)
            where = f"step {t}"
            if not isinstance(result, StepResult):
                raise self.fail(where, f"returned {type(result).__name__}; step returns a StepResult.")
            obs, reward, term, trunc, info = result
            self.check_obs(obs, f"{where} obs")
            self._check_flat(reward, np.float32, f"{where} reward")
            if not np.all(np.isfinite(reward)):
                raise self.fail(f"{where} reward", f"{reward} has non-finite values.")
            self._check_flat(term, np.bool_, f"{where} terminated")
            self._check_flat(trunc, np.bool_, f"{where} truncated")
            if not isinstance(info, dict):
                raise self.fail(f"{where} info", f"got {type(info).__name__}; info is a dict.")
            done = term | trunc
            if same_step:
                if "final_obs" not in info:
                    raise self.fail(f"{where} info", "'final_obs' missing; SAME_STEP envs return it on every step.")
                self.check_obs(info["final_obs"], f"{where} info['final_obs']")
                for i in np.flatnonzero(~done):
                    if not _obs_equal(_row(info["final_obs"], int(i)), _row(obs, int(i))):
                        raise self.fail(
                            f"{where} info['final_obs']", f"row {i} differs from obs although env {i} did not finish."
                        )
            else:
                if "final_obs" in info:
                    raise self.fail(f"{where} info", "'final_obs' present; NEXT_STEP envs do not return it.")
                if np.any(reward[prev_done] != 0) or np.any(done[prev_done]):
                    raise self.fail(
                        where,
                        "an env that finished on the previous step must return reward 0 and "
                        "terminated = truncated = False on its NEXT_STEP reset step.",
                    )
            counted = ~prev_done if not same_step else np.ones(n, dtype=bool)
            ret += np.where(counted, reward, 0.0)
            length += counted
            has_success = self._check_episode(info, done, ret, length, has_success, where)
            episodes += int(done.sum())
            n_term += int(term.sum())
            n_trunc += int((trunc & ~term).sum())
            ret[done] = 0.0
            length[done] = 0
            prev_done = done if not same_step else prev_done
        return CheckReport(steps=steps, episodes=episodes, terminated=n_term, truncated=n_trunc)

    def _check_flat(self, arr: Any, dtype: type, where: str) -> None:
        n = self.env.num_envs
        if not isinstance(arr, np.ndarray) or arr.shape != (n,) or arr.dtype != dtype:
            got = f"{type(arr).__name__} {getattr(arr, 'shape', '')} {getattr(arr, 'dtype', '')}".strip()
            raise self.fail(where, f"got {got}; it must be a numpy {np.dtype(dtype)} array of shape ({n},).")

    def _check_episode(
        self,
        info: dict[str, Any],
        done: np.ndarray,
        ret: np.ndarray,
        length: np.ndarray,
        has_success: bool | None,
        where: str,
    ) -> bool:
        ep = info.get("episode")
        field = f"{where} info['episode']"
        if not isinstance(ep, dict):
            raise self.fail(field, f"got {type(ep).__name__}; every step reports a dict of episode metrics.")
        for key, dtype in (("mask", np.bool_), ("return", np.float32), ("length", np.int32)):
            if key not in ep:
                raise self.fail(field, f"key {key!r} missing; it holds 'mask', 'return', 'length' (and 'success').")
            self._check_flat(ep[key], dtype, f"{field}[{key!r}]")
        if not np.array_equal(ep["mask"], done):
            raise self.fail(f"{field}['mask']", f"{ep['mask']} != terminated | truncated {done}.")
        if not np.array_equal(ep["length"][done], length[done]) or np.any(ep["length"][~done] != 0):
            raise self.fail(
                f"{field}['length']",
                f"{ep['length']} but the checker counted {np.where(done, length, 0)} steps in the finished episodes.",
            )
        if not np.allclose(ep["return"][done], ret[done], rtol=_RETURN_RTOL, atol=_RETURN_ATOL) or np.any(
            ep["return"][~done] != 0
        ):
            raise self.fail(
                f"{field}['return']",
                f"{ep['return']} but the rewards of the finished episodes sum to {np.where(done, ret, 0)}.",
            )
        now = "success" in ep
        if has_success is not None and now != has_success:
            raise self.fail(f"{field}['success']", "present on some steps only; report it on every step or never.")
        if now:
            self._check_flat(ep["success"], np.bool_, f"{field}['success']")
            if np.any(ep["success"][~done]):
                raise self.fail(f"{field}['success']", "True for an env whose episode did not end at this step.")
        return now

    def check_close(self) -> None:
        try:
            self.env.close()
            self.env.close()
        except Exception as exc:
            raise self.fail(
                "close()", f"a second close() raised {type(exc).__name__}: {exc}; make it a no-op."
            ) from exc


def _sample(space: gym.Space[Any], n: int) -> np.ndarray:
    return np.stack([np.asarray(space.sample()) for _ in range(n)])


def _row(obs: Obs, i: int) -> Any:
    if isinstance(obs, dict):
        return {k: v[i] for k, v in obs.items()}
    return obs[i]


def _obs_equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict)
            and isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_obs_equal(a[k], b[k]) for k in a)
        )
    return bool(np.array_equal(a, b))
