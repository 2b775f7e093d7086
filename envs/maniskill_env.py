"""ManiSkill 3 adapter behind the ``VectorEnv`` protocol.

Two simulation backends, chosen by ``sim_backend``:

- ``"cpu"``: SAPIEN's CPU physics, which holds one env per ManiSkill instance. ``N`` envs are either
  ``N`` worker processes, one env each (``vectorization="process"``), or ``N`` instances stepped in
  a loop in this process (``vectorization="loop"``, the default). Processes step in parallel but
  each imports torch and mani_skill and builds its own renderer. Measured on a 2-core machine with
  PushCube-v1 state observations: one env 450-750 env-steps/s; two envs ~700 env-steps/s either way
  (two cores leave processes nothing to gain), but processes take 5-25 s to start against 0.5 s.
  Use processes on machines with a free core per env.
- ``"gpu"``: ManiSkill's batched GPU physics: one instance with ``num_envs = N`` on CUDA; done envs
  are reset with partial resets. Observations are copied to numpy.

SAPIEN needs a Vulkan device even for state observations. On a machine without a GPU,
``scripts/install_vulkan.sh`` installs Mesa's software driver (lavapipe); this module points
``VK_ICD_FILENAMES`` at it when that variable is unset, the CPU backend is used and no NVIDIA ICD is
installed, and sets ``MS_SKIP_ASSET_DOWNLOAD_PROMPT=1`` so a missing asset fails instead of prompting.
Both happen when an env is built, never at import.

Observations: ``obs_mode="state"`` gives a ``float32 [N, D]`` array; ``obs_mode="rgb"`` gives
``{"state": float32 [N, D], "rgb": uint8 [N, H, W, 3 * cameras]}`` (camera images concatenated on
the channel axis). ``info["episode"]["success"]`` is whether ManiSkill's ``info["success"]`` was
True at any step of the finished episode.
"""

from __future__ import annotations

import contextlib
import glob
import multiprocessing as mp
import os
import traceback
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal, Protocol

import gymnasium as gym
import numpy as np

from rlinf.envs.vector_env import (
    AutoReset,
    EpisodeTracker,
    Obs,
    Seed,
    StepResult,
    check_actions,
    seeds_for,
    select_obs,
    stack_obs,
)

ObsMode = Literal["state", "rgb"]
SimBackend = Literal["cpu", "gpu"]
Vectorization = Literal["process", "loop"]

_ICD_DIRS = ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")
_WORKER_START_TIMEOUT_S = 300.0


def lavapipe_icd() -> str | None:
    """The path of Mesa's lavapipe Vulkan ICD file, or None when it is not installed."""
    for d in _ICD_DIRS:
        found = sorted(glob.glob(os.path.join(d, "lvp_icd*.json")))
        if found:
            return found[0]
    return None


def configure_vulkan(sim_backend: SimBackend = "cpu") -> None:
    """Sets ``MS_SKIP_ASSET_DOWNLOAD_PROMPT`` and, for CPU physics without an NVIDIA driver, points
    ``VK_ICD_FILENAMES`` at lavapipe; variables that are already set are left alone."""
    os.environ.setdefault("MS_SKIP_ASSET_DOWNLOAD_PROMPT", "1")
    if "VK_ICD_FILENAMES" in os.environ or sim_backend != "cpu":
        return
    if any(glob.glob(os.path.join(d, "nvidia_icd*.json")) for d in _ICD_DIRS):
        return
    icd = lavapipe_icd()
    if icd is not None:
        os.environ["VK_ICD_FILENAMES"] = icd


def vulkan_problem(sim_backend: SimBackend = "cpu") -> str | None:
    """Why SAPIEN cannot render here, or None when it can (creates a render system in this process)."""
    configure_vulkan(sim_backend)
    try:
        import sapien

        sapien.render.RenderSystem()
    except Exception as exc:
        return (
            f"SAPIEN found no usable Vulkan device ({type(exc).__name__}: {exc}); "
            f"VK_ICD_FILENAMES={os.environ.get('VK_ICD_FILENAMES')!r}. Run scripts/install_vulkan.sh "
            f"(Mesa >= 24 lavapipe) and export VK_ICD_FILENAMES to the path it prints."
        )
    return None


@dataclass(frozen=True)
class _Spec:
    env_id: str
    obs_mode: ObsMode
    sim_backend: SimBackend
    num_envs: int
    control_mode: str | None
    max_episode_steps: int | None
    ignore_terminations: bool


def _build(spec: _Spec) -> Any:
    """Builds one ManiSkill instance (``spec.num_envs`` envs on GPU, one on CPU); its API is batched torch."""
    configure_vulkan(spec.sim_backend)
    import mani_skill.envs  # noqa: F401  (registers the ManiSkill ids with gymnasium)
    from mani_skill.utils.wrappers.flatten import FlattenRGBDObservationWrapper

    kwargs: dict[str, Any] = {
        "num_envs": spec.num_envs if spec.sim_backend == "gpu" else 1,
        "obs_mode": spec.obs_mode,
        "sim_backend": spec.sim_backend,
    }
    if spec.control_mode is not None:
        kwargs["control_mode"] = spec.control_mode
    if spec.max_episode_steps is not None:
        kwargs["max_episode_steps"] = spec.max_episode_steps
    env = gym.make(spec.env_id, **kwargs)
    if spec.obs_mode == "rgb":
        env = FlattenRGBDObservationWrapper(env, rgb=True, depth=False, state=True)
    return env


def _to_numpy(obs: Any) -> Obs:
    """ManiSkill's batched torch observations (tensor or dict of tensors) as numpy arrays."""
    if isinstance(obs, dict):
        return {k: v.detach().cpu().numpy() for k, v in obs.items()}
    return obs.detach().cpu().numpy()


def _first(obs: Obs) -> Any:
    if isinstance(obs, dict):
        return {k: v[0] for k, v in obs.items()}
    return obs[0]


class _SingleEnv:
    """One CPU-physics ManiSkill env that auto-resets itself on the same step."""

    def __init__(self, spec: _Spec) -> None:
        self.spec = spec
        self.env = _build(spec)
        base = self.env.unwrapped
        self.observation_space: gym.Space[Any] = base.single_observation_space
        self.action_space: gym.Space[Any] = base.single_action_space

    def reset(self, seed: int | None) -> Any:
        obs, _ = self.env.reset(seed=seed)
        return _first(_to_numpy(obs))

    def step(self, action: np.ndarray) -> tuple[Any, Any, float, bool, bool, bool]:
        """Returns ``(obs, final_obs or None, reward, terminated, truncated, success)``."""
        obs, reward, term, trunc, info = self.env.step(action[None])
        success = bool(info["success"][0]) if "success" in info else False
        terminated = False if self.spec.ignore_terminations else bool(term[0])
        truncated = bool(trunc[0])
        row = _first(_to_numpy(obs))
        final = None
        if terminated or truncated:
            final, row = row, self.reset(None)
        return row, final, float(reward[0]), terminated, truncated, success

    def close(self) -> None:
        self.env.close()


class _Batch(Protocol):
    observation_space: gym.Space[Any]
    action_space: gym.Space[Any]

    def reset(self, seeds: list[int | None]) -> Obs: ...

    def step(self, actions: np.ndarray) -> tuple[Obs, Obs, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(obs, final_obs, reward, terminated, truncated, success)``, auto-reset on the same step."""
        ...

    def close(self) -> None: ...


def _gather(
    results: Sequence[tuple[Any, Any, float, bool, bool, bool]],
) -> tuple[Obs, Obs, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    obs = stack_obs([r[0] for r in results])
    done = np.array([r[1] is not None for r in results], dtype=bool)
    final = obs
    if done.any():
        final = stack_obs([r[1] if r[1] is not None else r[0] for r in results])
    return (
        obs,
        final,
        np.array([r[2] for r in results], dtype=np.float32),
        np.array([r[3] for r in results], dtype=bool),
        np.array([r[4] for r in results], dtype=bool),
        np.array([r[5] for r in results], dtype=bool),
    )


class _LoopBatch:
    """``N`` CPU envs stepped one after another in this process."""

    def __init__(self, spec: _Spec, num_envs: int) -> None:
        self.envs = [_SingleEnv(spec) for _ in range(num_envs)]
        self.observation_space = self.envs[0].observation_space
        self.action_space = self.envs[0].action_space

    def reset(self, seeds: list[int | None]) -> Obs:
        return stack_obs([e.reset(s) for e, s in zip(self.envs, seeds, strict=True)])

    def step(self, actions: np.ndarray) -> tuple[Obs, Obs, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return _gather([e.step(a) for e, a in zip(self.envs, actions, strict=True)])

    def close(self) -> None:
        for e in self.envs:
            e.close()


def _worker_main(conn: Connection, spec: _Spec) -> None:
    """Runs one ``_SingleEnv`` in a worker process, answering ``(command, argument)`` messages."""
    try:
        import torch

        # One env per process and one process per env: more torch threads only contend for cores.
        torch.set_num_threads(1)
        env = _SingleEnv(spec)
        conn.send(("ok", (env.observation_space, env.action_space)))
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "step":
                conn.send(("ok", env.step(arg)))
            elif cmd == "reset":
                conn.send(("ok", env.reset(arg)))
            elif cmd == "close":
                env.close()
                conn.send(("ok", None))
                return
            else:
                conn.send(("error", f"unknown command {cmd!r}"))
    except (EOFError, KeyboardInterrupt):
        env.close()
    except Exception:
        conn.send(("error", traceback.format_exc()))


def _stop_workers(procs: list[Any], conns: list[Connection]) -> None:
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send(("close", None))
    for proc, conn in zip(procs, conns, strict=True):
        with contextlib.suppress(OSError, EOFError):  # the worker may already be gone
            if conn.poll(10.0):
                conn.recv()
        conn.close()
        proc.join(timeout=10.0)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5.0)


class _ProcessBatch:
    """``N`` CPU envs, one per worker process, stepped in parallel."""

    def __init__(self, spec: _Spec, num_envs: int, start_method: str) -> None:
        ctx: Any = mp.get_context(start_method)
        self.spec = spec
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for _ in range(num_envs):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, spec), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        # Stops the workers even if close() is never called.
        self._finalizer = weakref.finalize(self, _stop_workers, self.procs, self.conns)
        try:
            spaces = [self._recv(i, "start", timeout=_WORKER_START_TIMEOUT_S) for i in range(num_envs)]
        except Exception:
            self._finalizer()
            raise
        self.observation_space, self.action_space = spaces[0]

    def _recv(self, i: int, what: str, timeout: float | None = None) -> Any:
        conn = self.conns[i]
        if timeout is not None and not conn.poll(timeout):
            raise RuntimeError(
                f"ManiSkill worker {i} ({self.spec.env_id}) did not answer {what} within {timeout:.0f} s."
            )
        try:
            status, payload = conn.recv()
        except EOFError as exc:
            raise RuntimeError(
                f"ManiSkill worker {i} ({self.spec.env_id}) exited during {what} (exit code "
                f"{self.procs[i].exitcode}); see its output above."
            ) from exc
        if status != "ok":
            raise RuntimeError(f"ManiSkill worker {i} ({self.spec.env_id}) failed during {what}:\n{payload}")
        return payload

    def reset(self, seeds: list[int | None]) -> Obs:
        for conn, s in zip(self.conns, seeds, strict=True):
            conn.send(("reset", s))
        return stack_obs([self._recv(i, "reset") for i in range(len(self.conns))])

    def step(self, actions: np.ndarray) -> tuple[Obs, Obs, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        for conn, a in zip(self.conns, actions, strict=True):
            conn.send(("step", a))
        return _gather([self._recv(i, "step") for i in range(len(self.conns))])

    def close(self) -> None:
        self._finalizer()


class _GpuBatch:
    """ManiSkill's batched GPU physics: one instance holding all ``N`` envs."""

    def __init__(self, spec: _Spec) -> None:
        import torch

        self.spec = spec
        self.env = _build(spec)
        base = self.env.unwrapped
        self.observation_space: gym.Space[Any] = base.single_observation_space
        self.action_space: gym.Space[Any] = base.single_action_space
        self.device = base.device
        self._torch = torch

    def reset(self, seeds: list[int | None]) -> Obs:
        seed: list[int] | None = None if all(s is None for s in seeds) else [int(s or 0) for s in seeds]
        obs, _ = self.env.reset(seed=seed)
        return _to_numpy(obs)

    def step(self, actions: np.ndarray) -> tuple[Obs, Obs, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        torch = self._torch
        act = torch.as_tensor(actions, device=self.device)
        obs, reward, term, trunc, info = self.env.step(act)
        if self.spec.ignore_terminations:
            term = torch.zeros_like(term)
        done = term | trunc
        final = _to_numpy(obs)
        out = final
        if bool(done.any()):
            new_obs, _ = self.env.reset(options={"env_idx": torch.nonzero(done).flatten()})
            out = select_obs(done.cpu().numpy(), _to_numpy(new_obs), final)
        success = info["success"] if "success" in info else torch.zeros_like(done)
        return (
            out,
            final,
            reward.detach().float().cpu().numpy(),
            term.cpu().numpy().astype(bool),
            trunc.cpu().numpy().astype(bool),
            success.cpu().numpy().astype(bool),
        )

    def close(self) -> None:
        self.env.close()


class ManiSkillVectorEnv:
    """``num_envs`` ManiSkill 3 envs with same-step auto-reset and episode metrics.

    Args:
        env_id: a ManiSkill id, e.g. ``"PushCube-v1"`` (PickCube, PushCube and StackCube ship their
            assets with the wheel; others may need a download).
        num_envs: ``N``.
        obs_mode: ``"state"`` (flat vector) or ``"rgb"`` (state vector plus camera images).
        sim_backend: ``"cpu"`` (SAPIEN CPU physics, one instance per env) or ``"gpu"`` (CUDA, batched).
        vectorization: with ``"cpu"``: ``"process"`` (one worker process per env, parallel) or
            ``"loop"`` (all envs in this process). Ignored with ``"gpu"`` and when ``num_envs == 1``.
        control_mode: ManiSkill controller, e.g. ``"pd_ee_delta_pose"``; None keeps the task's default.
        max_episode_steps: overrides the task's time limit.
        ignore_terminations: never report ``terminated`` (success does not end an episode), so every
            episode runs to the time limit; success is still tracked.
        auto_reset: only ``AutoReset.SAME_STEP`` is implemented.
        start_method: ``"spawn"`` or ``"forkserver"`` for ``"process"``. ``"fork"`` is refused: a
            child forked after SAPIEN or torch started threads in the parent can deadlock (seen here).
    """

    def __init__(
        self,
        env_id: str,
        num_envs: int,
        *,
        obs_mode: ObsMode = "state",
        sim_backend: SimBackend = "cpu",
        vectorization: Vectorization = "process",
        control_mode: str | None = None,
        max_episode_steps: int | None = None,
        ignore_terminations: bool = False,
        auto_reset: AutoReset = AutoReset.SAME_STEP,
        start_method: str = "spawn",
    ) -> None:
        where = f"ManiSkillVectorEnv({env_id!r})"
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"{where}: num_envs={num_envs!r} must be an int >= 1.")
        if obs_mode not in ("state", "rgb"):
            raise ValueError(f"{where}: obs_mode={obs_mode!r} is not supported; use 'state' or 'rgb'.")
        if sim_backend not in ("cpu", "gpu"):
            raise ValueError(f"{where}: sim_backend={sim_backend!r} is not supported; use 'cpu' or 'gpu'.")
        if vectorization not in ("process", "loop"):
            raise ValueError(f"{where}: vectorization={vectorization!r} is not supported; use 'process' or 'loop'.")
        if auto_reset is not AutoReset.SAME_STEP:
            raise ValueError(
                f"{where}: auto_reset={auto_reset} is not implemented for ManiSkill; use AutoReset.SAME_STEP."
            )
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(
                f"{where}: start_method={start_method!r} is not supported; use 'spawn' or 'forkserver' "
                f"(forked workers can deadlock on threads the parent started)."
            )
        self.env_id = env_id
        self.obs_mode = obs_mode
        self.sim_backend = sim_backend
        self._num_envs = num_envs
        spec = _Spec(env_id, obs_mode, sim_backend, num_envs, control_mode, max_episode_steps, ignore_terminations)
        self._batch: _Batch
        if sim_backend == "gpu":
            self.vectorization = "gpu"
            self._batch = _GpuBatch(spec)
        elif vectorization == "process" and num_envs > 1:
            self.vectorization = "process"
            self._batch = _ProcessBatch(spec, num_envs, start_method)
        else:
            self.vectorization = "loop"
            self._batch = _LoopBatch(spec, num_envs)
        self._tracker = EpisodeTracker(num_envs, track_success=True)
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"ManiSkillVectorEnv({self.env_id!r}, num_envs={self._num_envs}, obs_mode={self.obs_mode!r}, "
            f"sim_backend={self.sim_backend!r}, vectorization={self.vectorization!r})"
        )

    @property
    def num_envs(self) -> int:
        return self._num_envs

    @property
    def observation_space(self) -> gym.Space[Any]:
        return self._batch.observation_space

    @property
    def action_space(self) -> gym.Space[Any]:
        return self._batch.action_space

    @property
    def auto_reset(self) -> AutoReset:
        return AutoReset.SAME_STEP

    def reset(self, *, seed: Seed = None, options: dict[str, Any] | None = None) -> tuple[Obs, dict[str, Any]]:
        """Resets every env; ``seed`` as in the protocol. ``options`` is not supported (must be None)."""
        self._check_open("reset")
        if options:
            raise ValueError(f"{self!r}: reset(options={options!r}) is not supported; pass options=None.")
        obs = self._batch.reset(seeds_for(seed, self._num_envs, repr(self)))
        self._tracker.reset()
        self._started = True
        return obs, {}

    def step(self, actions: np.ndarray) -> StepResult:
        """Steps every env with ``actions float32 [N, *action_space.shape]``."""
        self._check_open("step")
        if not self._started:
            raise RuntimeError(f"{self!r}: step() called before reset(); call reset(seed=...) first.")
        arr = check_actions(actions, self.action_space, self._num_envs, repr(self))
        arr = arr.astype(self.action_space.dtype, copy=False)
        obs, final, reward, terminated, truncated, success = self._batch.step(arr)
        info = {
            "final_obs": final,
            "episode": self._tracker.step(reward, terminated | truncated, success),
        }
        return StepResult(obs, reward, terminated, truncated, info)

    def close(self) -> None:
        """Closes the simulators and stops worker processes; safe to call again."""
        if self._closed:
            return
        self._closed = True
        self._batch.close()

    def _check_open(self, method: str) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r}: {method}() called after close(); build a new env.")
