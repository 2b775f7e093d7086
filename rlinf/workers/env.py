"""EnvWorker: vectorised envs split into stages that ping-pong with the policy rollout worker.

Each env rank owns ``num_envs / world_size`` envs, cut into ``S`` stages (sub-batches, one
``VectorEnv`` each). A rollout of ``T`` steps goes stage by stage::

    send obs of every stage
    for t in 0..T-1:
        for s in 0..S-1:
            wait for stage s's actions; step stage s; send its new observations

The policy answers requests in order, so while it computes stage ``s``'s actions this worker
simulates stage ``s - 1``: with ``S = 2`` half of the envs are simulated while the policy runs on the
other half. Placed on different devices (CPU slots or GPUs), simulation and inference overlap; on
one device ``S = 1`` is the synchronous loop. Staging does not change what happens: stage ``s``
holds the global envs ``[s * n, (s + 1) * n)`` of its rank with the same seeds, so with
deterministic actions the trajectories equal those of one unstaged ``VectorEnv``.

With ``rollout.inline`` the env rank acts itself with its own copy of the policy
(``EnvWorker.attach_policy``) instead of sending requests: the same requests and replies, without the
two hand-overs between processes per step. That pays when both are cheap and share one device
(CartPole with a small MLP), where a hand-over costs more than the step it carries; nothing overlaps then.

The observations sent after the last step get values (the bootstrap of the last step) and actions
that are not used: the next rollout asks again, under the weights it then has. Truncated episodes
(time limits) are bootstrapped from the value of their final observation, which travels with the
next request of the same stage.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlinf.channel import Channel
from rlinf.envs import AutoReset, EnvConfig, Obs, VectorEnv, make_env
from rlinf.errors import ConfigError
from rlinf.metrics import merge_rank_metrics
from rlinf.trace import tracer
from rlinf.worker import Worker
from rlinf.workers.weights import clear_published, load_state_inplace, newest_state, rank_weights_channel, receive_state

EnvFactory = Callable[[EnvConfig], VectorEnv]
"""Builds one stage's ``VectorEnv`` from the env section (with ``num_envs`` set to the stage's size)."""


@dataclass(frozen=True)
class ObsRequest:
    """Env -> policy: one stage's observations.

    Args:
        env_rank: the sending env rank (the reply goes to its inbox).
        stage: the stage index.
        obs: ``[n, ...]`` observations (array or dict of arrays).
        bootstrap_obs: ``[k, ...]`` final observations of the envs truncated at the previous step, or None.
        deterministic: take the policy's mode instead of sampling.
    """

    env_rank: int
    stage: int
    obs: Obs
    bootstrap_obs: Obs | None
    deterministic: bool


@dataclass(frozen=True)
class ActionReply:
    """Policy -> env: actions for one ``ObsRequest``.

    Args:
        stage: the stage of the request.
        actions: ``[n, *action_shape]`` in the env's action space.
        logprobs: ``float32 [n]`` log-probs of the actions.
        values: ``float32 [n]`` values of the observations.
        bootstrap_values: ``float32 [k]`` values of the request's ``bootstrap_obs``.
        version: the policy version that answered.
    """

    stage: int
    actions: np.ndarray
    logprobs: np.ndarray
    values: np.ndarray
    bootstrap_values: np.ndarray
    version: int


@dataclass(frozen=True)
class EndOfRollout:
    """Env -> policy: this env rank sends nothing more in this rollout."""

    env_rank: int


@dataclass(frozen=True)
class Trajectory:
    """``T`` steps of one stage's ``n`` envs, time-major; what the actor trains on.

    Args:
        obs: ``[T, n, ...]`` observation each step started from (tensor or dict of tensors).
        actions: ``[T, n, *action_shape]``.
        logprobs: ``float32 [T, n]`` under the policy that acted.
        values: ``float32 [T, n]`` of ``obs``.
        next_values: ``float32 [T, n]`` of the state each step led to: the next row's value, the value of
            the observation after the last step in the last row, and the value of the final observation
            where an episode was truncated (what ``rlinf.algorithms.gae`` takes).
        rewards: ``float32 [T, n]``.
        terminated: ``bool [T, n]``.
        truncated: ``bool [T, n]``.
        mask: ``bool [T, n]``, steps that count: false on ``NEXT_STEP`` reset steps, and after an env's
            first episode when the rollout keeps only first episodes (GRPO).
        group_ids: ``int64 [n]`` global reset group of each env (its global index when groups have size 1).
        version: the policy version that acted.
        env_rank: the env rank that ran it.
        stage: the stage index.
    """

    obs: Tensor | dict[str, Tensor]
    actions: Tensor
    logprobs: Tensor
    values: Tensor
    next_values: Tensor
    rewards: Tensor
    terminated: Tensor
    truncated: Tensor
    mask: Tensor
    group_ids: Tensor
    version: int
    env_rank: int
    stage: int

    @property
    def num_steps(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def num_envs(self) -> int:
        return int(self.rewards.shape[1])


class ActingPolicy:
    """One rank's copy of the policy that answers ``ObsRequest`` items, tagged with the version of the
    weights it holds: a ``PolicyRolloutWorker`` rank holds one, and so does an env rank acting itself.

    Args:
        make_policy: ``(observation_space, action_space) -> policy``.
        spaces: ``(observation_space, action_space)`` of one env.
        device: where the policy computes.
        group_name: the holding worker group's name; published weights arrive on its ranks' channels.
        rank: the holding rank (sampling randomness is ``seed`` plus a per-rank offset).
        seed: sampling randomness.
    """

    def __init__(
        self,
        make_policy: Callable[[Any, Any], Any],
        spaces: tuple[Any, Any],
        device: torch.device,
        group_name: str,
        rank: int,
        seed: int = 0,
    ) -> None:
        torch.manual_seed(seed + 1_000_003 * (rank + 1))
        self.policy: Any = make_policy(*spaces).to(device)
        self.policy.eval()
        self.version = 0
        self.loaded = False  # until the actor's weights arrive, version 0 is this rank's own initialisation
        self._weights = rank_weights_channel(group_name, rank)
        clear_published(group_name, rank)  # a previous run's group of this name left weights behind

    def load(self, state: dict[str, Tensor], version: int) -> None:
        """Copies ``state`` into the policy and tags later answers with ``version``."""
        load_state_inplace(self.policy, state)
        self.version, self.loaded = version, True

    def newest(self, need_version: int) -> tuple[dict[str, Tensor] | None, int]:
        """The newest published weights if newer than those held, waiting for ``need_version`` (``newest_state``)."""
        return newest_state(self._weights, self.version if self.loaded else -1, need_version)

    @torch.no_grad()
    def answer(self, req: ObsRequest) -> ActionReply:
        """Actions, log-probs and values for one request (and values of its bootstrap observations)."""
        actions, logprobs, values = self.policy.act(req.obs, deterministic=req.deterministic)
        boot = np.zeros(0, dtype=np.float32)
        if req.bootstrap_obs is not None:
            boot = self.policy.value(req.bootstrap_obs).float().cpu().numpy()
        return ActionReply(
            req.stage,
            actions.cpu().numpy(),
            logprobs.float().cpu().numpy(),
            values.float().cpu().numpy(),
            boot,
            self.version,
        )


def take_rows(obs: Obs, rows: np.ndarray) -> Obs:
    """Rows ``rows`` of a batch of observations (array or dict of arrays)."""
    if isinstance(obs, dict):
        return {k: v[rows] for k, v in obs.items()}
    return obs[rows]


def _stack(rows: list[Any]) -> Tensor | dict[str, Tensor]:
    if isinstance(rows[0], dict):
        return {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
    return torch.from_numpy(np.stack(rows))


class _StageBuffer:
    """What one stage records during a rollout."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.obs: list[Obs] = []
        self.actions: list[np.ndarray] = []
        self.logprobs: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.rewards: list[np.ndarray] = []
        self.terminated: list[np.ndarray] = []
        self.truncated: list[np.ndarray] = []
        self.mask: list[np.ndarray] = []
        self.bootstrap: list[tuple[int, np.ndarray, np.ndarray]] = []  # (step, env rows, values)
        self.version = -1

    def trajectory(self, final_values: np.ndarray, group_ids: np.ndarray, env_rank: int, stage: int) -> Trajectory:
        values = np.stack(self.values).astype(np.float32)
        next_values = np.concatenate([values[1:], final_values.astype(np.float32)[None]])
        for t, rows, v in self.bootstrap:
            next_values[t, rows] = v
        return Trajectory(
            obs=_stack(self.obs),
            actions=torch.from_numpy(np.stack(self.actions)),
            logprobs=torch.from_numpy(np.stack(self.logprobs).astype(np.float32)),
            values=torch.from_numpy(values),
            next_values=torch.from_numpy(next_values),
            rewards=torch.from_numpy(np.stack(self.rewards).astype(np.float32)),
            terminated=torch.from_numpy(np.stack(self.terminated)),
            truncated=torch.from_numpy(np.stack(self.truncated)),
            mask=torch.from_numpy(np.stack(self.mask)),
            group_ids=torch.from_numpy(group_ids.astype(np.int64)),
            version=self.version,
            env_rank=env_rank,
            stage=stage,
        )


def stage_size(cfg: EnvConfig, ranks: int, stages: int) -> int:
    """Envs per stage when ``cfg.num_envs`` is split over ``ranks`` env ranks and ``stages`` stages.

    Raises:
        ConfigError: the split is uneven, or a stage would cut a reset group in two.
    """
    if not isinstance(stages, int) or stages < 1:
        raise ConfigError(f"rollout.stages={stages!r} must be an integer >= 1 (2 overlaps env and policy).")
    split = ranks * stages
    if cfg.num_envs % split:
        fix = max(split, cfg.num_envs - cfg.num_envs % split)
        raise ConfigError(
            f"env.num_envs={cfg.num_envs} does not split into {ranks} env rank(s) x {stages} stage(s); every "
            f"stage needs the same number of envs. Try env.num_envs={fix}."
        )
    per_stage = cfg.num_envs // split
    if per_stage % cfg.group_size:
        fix = split * cfg.group_size * max(1, per_stage // cfg.group_size)
        raise ConfigError(
            f"each stage holds {per_stage} envs (env.num_envs={cfg.num_envs} / {ranks} rank(s) / {stages} "
            f"stage(s)), which is not a multiple of env.group_size={cfg.group_size}; reset groups must not "
            f"straddle stages. Use env.num_envs={fix}."
        )
    return per_stage


class EnvWorker(Worker):
    """Owns ``cfg.num_envs / world_size`` envs in ``stages`` stages; see the module docstring.

    Args:
        cfg: the env section; ``num_envs`` counts the envs of all ranks together.
        stages: ``S``, sub-batches per rank that take turns with the policy.
        return_window: ``env/return_window`` averages the returns of this many latest episodes.
        env_factory: builds one stage's env (default ``rlinf.envs.make_env``).
    """

    def __init__(
        self, cfg: EnvConfig, stages: int = 1, return_window: int = 32, env_factory: EnvFactory = make_env
    ) -> None:
        per_stage = stage_size(cfg, self.world_size, stages)
        if return_window < 1:
            raise ConfigError(f"run.return_window={return_window} must be >= 1 episode.")
        self.cfg = cfg
        self.per_stage = per_stage
        self.first = self.rank * stages * per_stage  # global index of this rank's first env
        stage_cfg = dataclasses.replace(cfg, num_envs=per_stage, group_size=1)
        self.envs: list[VectorEnv] = []
        try:
            for _ in range(stages):
                self.envs.append(env_factory(stage_cfg))
        except BaseException:
            self.close()
            raise
        self.next_step_reset = self.envs[0].auto_reset is AutoReset.NEXT_STEP
        self._obs: list[Obs] = []
        self._pending_reset = [np.zeros(per_stage, dtype=bool) for _ in range(stages)]  # NEXT_STEP only
        self._recent: deque[float] = deque(maxlen=return_window)
        self._recent_success: deque[bool] = deque(maxlen=return_window)
        self._inbox = Channel(f"{self.group_name}:{self.rank}/actions/{uuid.uuid4().hex[:12]}", host="here")
        self._acting: ActingPolicy | None = None  # set by attach_policy (rollout.inline)

    # ---- queries -----------------------------------------------------------------------------------

    def inbox(self) -> Channel:
        """The channel this rank receives actions on (the policy rollout worker replies into it)."""
        return self._inbox

    def spaces(self) -> tuple[Any, Any]:
        """``(observation_space, action_space)`` of one env."""
        return self.envs[0].observation_space, self.envs[0].action_space

    def global_rows(self, stage: int) -> np.ndarray:
        """Global indices of stage ``stage``'s envs."""
        start = self.first + stage * self.per_stage
        return np.arange(start, start + self.per_stage)

    # ---- acting in this process (rollout.inline) -----------------------------------------------------

    def attach_policy(self, make_policy: Callable[[Any, Any], Any], seed: int = 0) -> None:
        """Builds this rank's own copy of the policy, so ``interact(None, ...)`` acts here instead of
        asking policy rollout ranks. Weights arrive as for a ``PolicyRolloutWorker``: published to this
        group (``EmbodiedActorWorker.publish_weights``) or pushed (``load_weights``).

        Args:
            make_policy: ``(observation_space, action_space) -> policy`` (the actor's factory).
            seed: sampling randomness (each rank adds its own offset, as policy rollout ranks do).
        """
        self._acting = ActingPolicy(make_policy, self.spaces(), self.device, self.group_name, self.rank, seed)

    def load_weights(self, state: dict[str, Tensor] | Channel, version: int) -> None:
        """Copies ``state`` into the attached policy and tags later actions with ``version``."""
        acting = self._attached("load_weights")
        state = receive_state(state, version)
        with self.device_lock():
            acting.load(state, version)

    def _attached(self, what: str) -> ActingPolicy:
        if self._acting is None:
            raise RuntimeError(
                f"EnvWorker.{what}: env rank {self.rank} has no policy of its own; call "
                f"EnvWorker.attach_policy first (rollout.inline), or pass the policy rollout ranks' inboxes."
            )
        return self._acting

    def offload(self) -> None:
        if self._acting is not None and self.device.type == "cuda":
            self._acting.policy.to("cpu")

    def onload(self) -> None:
        if self._acting is not None and self.device.type == "cuda":
            self._acting.policy.to(self.device)

    # ---- rollouts ----------------------------------------------------------------------------------

    def reset(self, round: int = 0) -> None:
        """Resets every stage with the seeds of reset round ``round`` (``EnvConfig.reset_groups``)."""
        seeds = self.cfg.reset_groups.seeds(round)
        self._obs = []
        for s, env in enumerate(self.envs):
            rows = self.global_rows(s)
            obs, _ = env.reset(seed=[seeds[i] for i in rows])
            self._obs.append(obs)
            self._pending_reset[s][:] = False

    def interact(
        self,
        policy: Sequence[Channel] | None,
        out: Channel | None,
        steps: int,
        *,
        reset_round: int | None = None,
        first_episode_only: bool = False,
        deterministic: bool = False,
        need_version: int | None = None,
    ) -> dict[str, float]:
        """Runs ``steps`` steps of every stage against the policy and puts one ``Trajectory`` per stage.

        Args:
            policy: the policy rollout ranks' inboxes; this rank talks to ``policy[rank % len(policy)]``.
                None acts with this rank's own policy (``attach_policy``).
            out: where trajectories go (None: only episode metrics, e.g. for evaluation).
            steps: ``T``, policy steps per env (fewer with ``first_episode_only`` once every episode ended).
            reset_round: reset every env with this round's seeds first (the first call resets with round 0).
            first_episode_only: mask out everything after each env's first episode, report only first
                episodes, and stop early when every env has finished one (GRPO rollouts from reset groups).
            deterministic: act with the policy's mode.
            need_version: with an own policy, first load the newest weights published to this group,
                waiting until they are at least this version (as ``PolicyRolloutWorker.serve`` does).

        Returns:
            ``env/*`` episode metrics and ``time/env*`` timings (combine ranks with ``merge_env_metrics``);
            with an own policy also the ``rollout/*`` and ``time/rollout*`` metrics ``serve`` would return.
        """
        if steps < 1:
            raise ValueError(f"EnvWorker.interact: steps={steps} must be >= 1.")
        if policy is not None and not policy:
            raise ValueError("EnvWorker.interact: pass the policy rollout ranks' inboxes (PolicyRolloutWorker.inbox).")
        if policy is None:
            acting = self._attached("interact")
            start = time.perf_counter()
            if need_version is not None:
                state, version = acting.newest(need_version)
                if state is not None:
                    self.load_weights(state, version)
            weights_s = time.perf_counter() - start
            with self.device_lock():
                metrics = self._interact(acting, out, steps, reset_round, first_episode_only, deterministic)
            metrics["time/rollout_weights"] = weights_s
            metrics["time/rollout"] = metrics["time/env_rollout"] + weights_s
            return metrics
        target = policy[self.rank % len(policy)]
        return self._interact(target, out, steps, reset_round, first_episode_only, deterministic)

    def _interact(
        self,
        target: Channel | ActingPolicy,
        out: Channel | None,
        steps: int,
        reset_round: int | None,
        first_episode_only: bool,
        deterministic: bool,
    ) -> dict[str, float]:
        """``interact`` against the policy rollout rank whose inbox is ``target``, or the rank's own policy."""
        if reset_round is not None or not self._obs:
            self.reset(reset_round or 0)
        start = time.perf_counter()
        tr = tracer()
        replies: deque[ActionReply] = deque()
        act_s = 0.0

        def send(req: ObsRequest) -> None:  # the own policy answers at once; its reply waits in `replies`
            nonlocal act_s
            if isinstance(target, Channel):
                target.put(req)
                return
            t0 = time.time()
            replies.append(target.answer(req))
            t1 = time.time()
            tr.add(f"act stage {req.stage}", "compute", t0, t1)
            act_s += t1 - t0

        def receive(stage: int) -> ActionReply:
            return self._receive(stage) if isinstance(target, Channel) else replies.popleft()

        n, S = self.per_stage, len(self.envs)
        bufs = [_StageBuffer(n) for _ in range(S)]
        alive = [np.ones(n, dtype=bool) for _ in range(S)]
        boot_rows: list[np.ndarray | None] = [None] * S
        returns: list[float] = []
        lengths: list[float] = []
        successes: list[bool] = []
        step_s = wait_s = 0.0
        for s in range(S):
            send(ObsRequest(self.rank, s, self._obs[s], None, deterministic))
        ran = 0
        for t in range(steps):
            for s, env in enumerate(self.envs):
                t0 = time.time()
                reply = receive(s)
                t1 = time.time()
                buf = bufs[s]
                rows_waiting = boot_rows[s]
                if rows_waiting is not None:
                    buf.bootstrap.append((t - 1, rows_waiting, reply.bootstrap_values))
                obs = self._obs[s]
                result = env.step(reply.actions)
                t2 = time.time()
                tr.add(f"step stage {s}", "compute", t1, t2)
                wait_s += t1 - t0
                step_s += t2 - t1
                counted = ~self._pending_reset[s]
                buf.obs.append(obs)
                buf.actions.append(reply.actions)
                buf.logprobs.append(reply.logprobs)
                buf.values.append(reply.values)
                buf.rewards.append(result.reward)
                buf.terminated.append(result.terminated)
                buf.truncated.append(result.truncated)
                buf.mask.append(counted & alive[s] if first_episode_only else counted)
                buf.version = reply.version if buf.version < 0 else min(buf.version, reply.version)
                done = result.terminated | result.truncated
                episode = result.info["episode"]
                ended_now = episode["mask"]
                if first_episode_only:  # metrics of first episodes only: later ones are biased to short ones
                    ended_now = ended_now & alive[s]
                    alive[s] &= ~(done & counted)
                if self.next_step_reset:
                    self._pending_reset[s] = done.copy()
                ended = np.flatnonzero(ended_now)
                if ended.size:
                    returns += episode["return"][ended].tolist()
                    lengths += episode["length"][ended].tolist()
                    if "success" in episode:
                        successes += episode["success"][ended].tolist()
                boot = None
                if not self.next_step_reset:  # NEXT_STEP: the next row's value is the final observation's
                    rows = np.flatnonzero(result.truncated & ~result.terminated)
                    boot_rows[s] = rows if rows.size else None
                    if rows.size:
                        boot = take_rows(result.info["final_obs"], rows)
                self._obs[s] = result.obs
                send(ObsRequest(self.rank, s, result.obs, boot, deterministic))
            ran = t + 1
            if first_episode_only and not any(a.any() for a in alive):
                break
        finals = []
        for s in range(S):
            reply = receive(s)
            rows_waiting = boot_rows[s]
            if rows_waiting is not None:
                bufs[s].bootstrap.append((ran - 1, rows_waiting, reply.bootstrap_values))
            finals.append(reply.values)
        if isinstance(target, Channel):
            target.put(EndOfRollout(self.rank))
        if out is not None:
            groups = self.cfg.reset_groups.group_ids
            for s, buf in enumerate(bufs):
                traj = buf.trajectory(finals[s], groups[self.global_rows(s)], self.rank, s)
                out.put(traj, version=traj.version, weight=float(n * ran))
        self._recent.extend(returns)
        self._recent_success.extend(successes)
        total = time.perf_counter() - start
        metrics = {
            "env/episodes": float(len(returns)),
            "env/steps": float(n * S * ran),
            "env/return_mean": float(np.mean(returns)) if returns else float("nan"),
            "env/length_mean": float(np.mean(lengths)) if lengths else float("nan"),
            "env/window_episodes": float(len(self._recent)),
            "env/return_window": float(np.mean(self._recent)) if self._recent else float("nan"),
            "time/env_step": step_s,
            "time/env_wait": wait_s,
            "time/env_rollout": total,
        }
        if isinstance(target, ActingPolicy):  # what PolicyRolloutWorker.serve reports, for the policy acting here
            metrics["rollout/samples"] = float(n * S * (ran + 1))
            metrics["rollout/version"] = float(target.version)
            metrics["time/rollout_compute"] = act_s
        if successes:
            metrics["env/success_rate"] = float(np.mean(successes))
        if self._recent_success:
            metrics["env/success_window"] = float(np.mean(self._recent_success))
        return metrics

    def _receive(self, stage: int) -> ActionReply:
        reply = self._inbox.get()
        if not isinstance(reply, ActionReply) or reply.stage != stage:
            got = reply.stage if isinstance(reply, ActionReply) else type(reply).__name__
            raise RuntimeError(
                f"env rank {self.rank} expected the actions of stage {stage} but got {got}; each env rank needs "
                f"exactly one policy rollout rank answering its requests in order."
            )
        return reply

    # ---- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Closes every stage's envs (simulators, worker processes)."""
        for env in getattr(self, "envs", []):
            env.close()

    def __del__(self) -> None:
        self.close()


def merge_env_metrics(results: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combines env ranks' ``interact`` metrics: counts add, means are weighted by their episodes,
    ``time/*`` take the slowest rank; the ``rollout/*`` metrics of ranks acting themselves combine as
    ``merge_rank_metrics`` combines policy rollout ranks'."""
    out: dict[str, float] = merge_rank_metrics(
        [{k: v for k, v in r.items() if k.startswith("rollout/")} for r in results]
    )
    episodes = sum(r.get("env/episodes", 0.0) for r in results)
    window = sum(r.get("env/window_episodes", 0.0) for r in results)
    for key in ("env/episodes", "env/steps", "env/window_episodes"):
        out[key] = sum(r.get(key, 0.0) for r in results)
    for key, weight_key, total in (
        ("env/return_mean", "env/episodes", episodes),
        ("env/length_mean", "env/episodes", episodes),
        ("env/success_rate", "env/episodes", episodes),
        ("env/return_window", "env/window_episodes", window),
        ("env/success_window", "env/window_episodes", window),
    ):
        parts = [(r[key], r.get(weight_key, 0.0)) for r in results if key in r and r.get(weight_key, 0.0) > 0]
        if parts and total > 0:
            out[key] = sum(v * w for v, w in parts) / sum(w for _, w in parts)
    for key in {k for r in results for k in r if k.startswith("time/")}:
        out[key] = max(r.get(key, 0.0) for r in results)
    return out
