"""Embodied RL workers: the policy rollout worker that answers env stages, and the actor that trains it.

``PolicyRolloutWorker`` holds a copy of the policy and answers ``ObsRequest`` items from env ranks
(see ``rlinf.workers.env``) with actions, log-probs and values, in arrival order; the actor pushes
new weights to it with a version number between rollouts. ``EmbodiedActorWorker`` takes the
rollout's ``Trajectory`` items, turns them into advantages with a pluggable function
(``gae_advantages`` for PPO, ``group_trajectory_advantages`` for GRPO) and runs minibatch epochs of
the PPO clipped loss (plus a value loss and an entropy bonus) with AdamW and gradient clipping.
Several actor ranks average their gradients over gloo (NCCL on GPUs) each minibatch.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from rlinf.algorithms import gae, group_advantage, ppo_clip_loss, value_loss
from rlinf.channel import Channel, Item
from rlinf.errors import ConfigError
from rlinf.placement import PlacementConfig
from rlinf.trace import tracer
from rlinf.worker import Worker
from rlinf.workers.env import ActingPolicy, ActionReply, EndOfRollout, EnvWorker, ObsRequest, Trajectory
from rlinf.workers.rollout import rank_share
from rlinf.workers.weights import (
    export_state,
    move_training_state,
    publish_state,
    receive_state,
    send_state,
)

if TYPE_CHECKING:
    from rlinf.group import WorkerGroup


PolicyFactory = Callable[[Any, Any], nn.Module]
"""``(observation_space, action_space) -> policy``, e.g. ``functools.partial(build_policy, policy_cfg)``.

The policy has ``act(obs, deterministic) -> (actions, logprobs [B], values [B])``,
``evaluate(obs, actions) -> (logprobs [B], entropy [B], values [B])`` and ``value(obs) -> [B]``,
as ``rlinf.models.policies.Policy`` does."""


# ---- configs ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbodiedRolloutConfig:
    """How envs and the policy take turns.

    Args:
        horizon: policy steps per env in one rollout (``T``); a rollout is ``num_envs * horizon`` steps.
        stages: sub-batches per env rank (``S``); 2 overlaps simulation of one half with inference on the
            other when env and rollout are on different devices, 1 is the synchronous loop.
        inline: each env rank acts with its own copy of the policy instead of policy rollout workers
            (the workflow then has no ``rollout`` component). Two processes taking turns on one device
            hand over twice per step; for a cheap simulator and a small policy (CartPole and an MLP)
            those hand-overs cost more than the step itself. Needs ``stages: 1``: nothing overlaps.
    """

    horizon: int = 128
    stages: int = 2
    inline: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.horizon, int) or self.horizon < 1:
            raise ConfigError(f"rollout.horizon={self.horizon!r} must be an integer >= 1 step; try 128.")
        if not isinstance(self.stages, int) or self.stages < 1:
            raise ConfigError(
                f"rollout.stages={self.stages!r} must be an integer >= 1; use 2 to overlap env and policy."
            )
        if self.inline and self.stages != 1:
            raise ConfigError(
                f"rollout.inline=true acts in the env process, where stages cannot overlap with the policy; "
                f"set rollout.stages=1 (or rollout.inline=false to pipeline {self.stages} stages)."
            )

    @property
    def components(self) -> tuple[str, ...]:
        """The workflow's components: no ``rollout`` when the env ranks act themselves."""
        return ("env", "actor") if self.inline else ("env", "rollout", "actor")

    def check_placement(self, placement: PlacementConfig) -> None:
        """Raises ConfigError when ``placement`` places a rollout component that ``inline`` does not have."""
        if self.inline and "rollout" in placement.components:
            raise ConfigError(
                "rollout.inline=true: each env rank acts with its own copy of the policy, on the env's devices, so "
                "there is no rollout component to place; remove placement.components.rollout "
                "(placement.components.rollout=null on the command line), or set rollout.inline=false."
            )


@dataclass(frozen=True)
class EmbodiedActorConfig:
    """Policy (and value) training.

    Args:
        lr: AdamW learning rate.
        lr_schedule: ``constant``, or ``linear`` decay to 0 over the run's steps.
        weight_decay: AdamW weight decay.
        adam_eps: AdamW epsilon.
        epochs: passes over each rollout.
        minibatches: minibatches per epoch (per actor rank).
        clip: PPO ratio clip (``1 +- clip``).
        value_clip: clip of the value update around the rollout's values; None for the plain squared error.
        vf_coef: weight of the value loss (0 trains no critic, as GRPO).
        ent_coef: weight of the entropy bonus.
        max_grad_norm: global gradient-norm clip (0 = none).
        gamma: discount per step.
        gae_lambda: GAE lambda.
        normalize_advantages: whiten advantages per minibatch.
        seed: initial weights (every actor rank gets the same) and minibatch order.
    """

    lr: float = 3e-4
    lr_schedule: Literal["constant", "linear"] = "constant"
    weight_decay: float = 0.0
    adam_eps: float = 1e-5
    epochs: int = 4
    minibatches: int = 4
    clip: float = 0.2
    value_clip: float | None = None
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 0.5
    gamma: float = 0.99
    gae_lambda: float = 0.95
    normalize_advantages: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"actor.lr={self.lr} must be > 0; try 3e-4.")
        if self.lr_schedule not in ("constant", "linear"):
            raise ConfigError(f"actor.lr_schedule={self.lr_schedule!r} is not one of ['constant', 'linear'].")
        for name in ("epochs", "minibatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"actor.{name}={value!r} must be an integer >= 1.")
        if not 0 < self.clip < 1:
            raise ConfigError(f"actor.clip={self.clip} must be in (0, 1); try 0.2.")
        if self.value_clip is not None and self.value_clip <= 0:
            raise ConfigError(f"actor.value_clip={self.value_clip} must be > 0, or null for no value clipping.")
        for name in ("vf_coef", "ent_coef", "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"actor.{name}={getattr(self, name)} must be >= 0.")
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"actor.{name}={getattr(self, name)} must be in [0, 1].")


@dataclass(frozen=True)
class EmbodiedRunConfig:
    """How long an embodied run is and where it writes.

    Args:
        steps: training steps (one rollout and one update each).
        target_return: stop early once ``env/return_window`` reaches it (None: run all steps).
        target_success: stop early once ``env/success_window`` reaches it (None: run all steps).
        return_window: latest episodes per env rank that ``env/return_window`` averages.
        save_every: checkpoint every this many steps (0 = only at the end).
        output_dir: parent of the run directory ``<output_dir>/<name>-<timestamp>``.
        name: run name prefix.
        cpu_cores_per_slot: cores per CPU slot of an embedded cluster.
        rollout_ahead: 0 is on-policy: each rollout acts with the weights of the step before. 1 starts
            the next rollout as soon as this one ends, with the weights at hand (one optimizer step
            older), so the envs and the policy collect while the actor trains; the PPO ratio
            against the rollout's log-probs corrects for it and ``actor/staleness`` reports it.
    """

    steps: int = 50
    target_return: float | None = None
    target_success: float | None = None
    return_window: int = 32
    save_every: int = 0
    output_dir: str = "runs"
    name: str = "embodied"
    cpu_cores_per_slot: int = 1
    rollout_ahead: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"run.steps={self.steps} must be >= 0.")
        if self.rollout_ahead not in (0, 1):
            raise ConfigError(
                f"run.rollout_ahead={self.rollout_ahead}: embodied runs collect at most one rollout ahead of "
                f"training; use 0 (on-policy) or 1 (the next rollout collects while this one trains)."
            )
        if self.return_window < 1:
            raise ConfigError(f"run.return_window={self.return_window} must be >= 1 episode; try 32.")
        if self.save_every < 0:
            raise ConfigError(f"run.save_every={self.save_every} must be >= 0 (0 = only at the end).")

    def reached(self, metrics: dict[str, float]) -> bool:
        """Whether the metrics meet a target that was set."""
        hit = False
        for target, key in ((self.target_return, "env/return_window"), (self.target_success, "env/success_window")):
            if target is not None:
                if metrics.get(key, float("-inf")) < target:
                    return False
                hit = True
        return hit


# ---- rollout ------------------------------------------------------------------------------------------


class PolicyRolloutWorker(Worker):
    """Answers env stages' observations with actions, log-probs and values.

    Args:
        make_policy: builds the policy from one env's spaces.
        observation_space: of one env.
        action_space: of one env.
        seed: sampling randomness (each rank adds its own offset).
    """

    def __init__(self, make_policy: PolicyFactory, observation_space: Any, action_space: Any, seed: int = 0) -> None:
        spaces = (observation_space, action_space)
        self.acting = ActingPolicy(make_policy, spaces, self.device, self.group_name, self.rank, seed)
        self._inbox = Channel(f"{self.group_name}:{self.rank}/obs/{uuid.uuid4().hex[:12]}", host="here")

    def inbox(self) -> Channel:
        """The channel this rank takes observations from."""
        return self._inbox

    def load_weights(self, state: dict[str, Tensor] | Channel, version: int) -> None:
        """Copies ``state`` (or this rank's copy from a :func:`send_state` channel) into the policy and
        tags later actions with ``version``."""
        state = receive_state(state, version)
        with self.device_lock():
            self.acting.load(state, version)

    def serve(self, envs: Sequence[Channel], need_version: int | None = None) -> dict[str, float]:
        """Answers requests until every env rank this rank serves (``e % world_size == rank``) has ended its rollout.

        Args:
            envs: every env rank's inbox (``EnvWorker.inbox``), in rank order.
            need_version: first load the newest weights the actor published
                (``EmbodiedActorWorker.publish_weights``), waiting until they are at least this version;
                None serves with the weights at hand (pushed ones).
        """
        mine = len(range(self.rank, len(envs), self.world_size))
        ended = answered = 0
        busy = 0.0
        start = time.perf_counter()
        if need_version is not None:
            state, version = self.acting.newest(need_version)
            if state is not None:
                self.load_weights(state, version)
        weights_s = time.perf_counter() - start
        tr = tracer()
        with self.device_lock():
            while ended < mine:
                req = self._inbox.get()
                if isinstance(req, EndOfRollout):
                    ended += 1
                    continue
                if not isinstance(req, ObsRequest):
                    raise TypeError(f"PolicyRolloutWorker got {type(req).__name__}; expected ObsRequest items.")
                t0 = time.time()
                reply = self.answer(req)
                t1 = time.time()
                tr.add(f"act stage {req.stage}", "compute", t0, t1)
                busy += t1 - t0
                envs[req.env_rank].put(reply, version=reply.version)
                answered += len(reply.values)
        return {
            "rollout/samples": float(answered),
            "rollout/version": float(self.acting.version),
            "time/rollout_compute": busy,
            "time/rollout_weights": weights_s,
            "time/rollout": time.perf_counter() - start,
        }

    def answer(self, req: ObsRequest) -> ActionReply:
        """Actions, log-probs and values for one request (and values of its bootstrap observations)."""
        return self.acting.answer(req)

    def offload(self) -> None:
        if self.device.type == "cuda":
            self.acting.policy.to("cpu")

    def onload(self) -> None:
        if self.device.type == "cuda":
            self.acting.policy.to(self.device)


# ---- advantages ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    """Per-step training targets of one trajectory.

    Args:
        advantages: ``[T, n]``.
        returns: ``[T, n]`` value targets, or None when no critic is trained.
    """

    advantages: Tensor
    returns: Tensor | None


AdvantageFn = Callable[[Sequence[Trajectory], EmbodiedActorConfig], list[Targets]]
"""``(trajectories, actor config) -> one Targets per trajectory``."""


def gae_advantages(trajectories: Sequence[Trajectory], cfg: EmbodiedActorConfig) -> list[Targets]:
    """PPO: GAE(``gamma``, ``gae_lambda``) advantages and returns, bootstrapped on truncation."""
    out = []
    for tr in trajectories:
        adv, ret = gae(
            tr.rewards,
            tr.values,
            tr.next_values,
            tr.terminated,
            tr.truncated,
            gamma=cfg.gamma,
            lam=cfg.gae_lambda,
        )
        out.append(Targets(adv, ret))
    return out


def group_trajectory_advantages(trajectories: Sequence[Trajectory], cfg: EmbodiedActorConfig) -> list[Targets]:
    """GRPO: each env's first-episode return, normalised within its reset group, for every step of the episode.

    The groups (``Trajectory.group_ids``) are contiguous runs of equal size; rollouts must keep only
    first episodes (``EnvWorker.interact(first_episode_only=True)``) so that a group's members start
    from one state.
    """
    out = []
    for tr in trajectories:
        ids = tr.group_ids
        _, counts = torch.unique_consecutive(ids, return_counts=True)
        size = int(counts[0])
        if size < 2 or bool((counts != size).any()):
            raise ValueError(
                f"trajectory of env rank {tr.env_rank} stage {tr.stage} has reset groups of sizes "
                f"{counts.tolist()}; GRPO needs groups of the same size >= 2. Set env.group_size >= 2 and a "
                f"num_envs that splits into whole groups per stage."
            )
        episode_return = (tr.rewards * tr.mask).sum(dim=0)
        adv = group_advantage(episode_return, size)
        out.append(Targets(adv[None, :].expand(tr.num_steps, -1).contiguous(), None))
    return out


# ---- actor --------------------------------------------------------------------------------------------


@dataclass
class _Batch:
    obs: Tensor | dict[str, Tensor]
    actions: Tensor
    logprobs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor | None

    def __len__(self) -> int:
        return int(self.logprobs.shape[0])

    def split(self, parts: int) -> list[_Batch]:
        """``parts`` contiguous minibatches (views), as ``Tensor.chunk`` cuts them."""

        def cut(t: Tensor) -> tuple[Tensor, ...]:
            return t.chunk(parts)

        obs = (
            [dict(zip(self.obs, rows, strict=True)) for rows in zip(*(cut(v) for v in self.obs.values()), strict=True)]
            if isinstance(self.obs, dict)
            else list(cut(self.obs))
        )
        returns = [None] * len(obs) if self.returns is None else list(cut(self.returns))
        columns = zip(
            obs, cut(self.actions), cut(self.logprobs), cut(self.values), cut(self.advantages), returns, strict=True
        )
        return [_Batch(*c) for c in columns]


def _select(x: Tensor, mask: Tensor) -> Tensor:
    """``[T, n, ...]`` -> ``[B, ...]``, the rows where ``mask [T, n]`` holds."""
    return x[mask]


def _flatten(trajectories: Sequence[Trajectory], targets: Sequence[Targets], device: torch.device) -> _Batch:
    """Every trajectory's counted steps (``mask``) as one flat batch on ``device``."""

    def cat(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts).to(device)

    masks = [tr.mask for tr in trajectories]
    first = trajectories[0].obs
    obs: Tensor | dict[str, Tensor]
    if isinstance(first, dict):
        obs = {k: cat([_select(tr.obs[k], m) for tr, m in zip(trajectories, masks, strict=True)]) for k in first}  # type: ignore[index]
    else:
        obs = cat([_select(tr.obs, m) for tr, m in zip(trajectories, masks, strict=True)])  # type: ignore[arg-type]
    returns = [tg.returns for tg in targets]
    return _Batch(
        obs=obs,
        actions=cat([_select(tr.actions, m) for tr, m in zip(trajectories, masks, strict=True)]),
        logprobs=cat([_select(tr.logprobs, m) for tr, m in zip(trajectories, masks, strict=True)]),
        values=cat([_select(tr.values, m) for tr, m in zip(trajectories, masks, strict=True)]),
        advantages=cat([_select(tg.advantages, m) for tg, m in zip(targets, masks, strict=True)]),
        returns=None
        if any(r is None for r in returns)
        else cat([_select(r, m) for r, m in zip(returns, masks, strict=True) if r is not None]),
    )


def _rows(obs: Tensor | dict[str, Tensor], idx: Tensor) -> Tensor | dict[str, Tensor]:
    if isinstance(obs, dict):
        return {k: v[idx] for k, v in obs.items()}
    return obs[idx]


def _shuffled(batch: _Batch, order: Tensor) -> _Batch:
    """``batch`` with its rows in ``order``."""
    return _Batch(
        obs=_rows(batch.obs, order),
        actions=batch.actions[order],
        logprobs=batch.logprobs[order],
        values=batch.values[order],
        advantages=batch.advantages[order],
        returns=None if batch.returns is None else batch.returns[order],
    )


class EmbodiedActorWorker(Worker):
    """Trains an actor-critic on trajectories with the PPO clipped loss.

    Args:
        cfg: the actor section.
        make_policy: builds the policy from one env's spaces (the same as the rollout's).
        observation_space: of one env.
        action_space: of one env.
        total_steps: training steps of the run (for ``lr_schedule=linear``).
    """

    def __init__(
        self,
        cfg: EmbodiedActorConfig,
        make_policy: PolicyFactory,
        observation_space: Any,
        action_space: Any,
        total_steps: int = 1,
    ) -> None:
        self.cfg = cfg
        self.total_steps = max(1, total_steps)
        torch.manual_seed(cfg.seed)  # every rank starts from the same weights
        self.policy: Any = make_policy(observation_space, action_space).to(self.device)
        self.policy.train()
        # The fused kernel steps every parameter in one call: small policies take many tiny steps.
        self.optimizer = torch.optim.AdamW(
            self.policy.parameters(), lr=cfg.lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=True
        )
        self.generator = torch.Generator().manual_seed(cfg.seed + self.rank)
        self.version = 0

    # ---- training --------------------------------------------------------------------------------

    def train(self, inp: Channel, num_items: int, advantage: AdvantageFn = gae_advantages) -> dict[str, float]:
        """Takes this rank's share of ``num_items`` trajectories, then runs the minibatch epochs.

        Args:
            inp: ``Trajectory`` items (one per env rank and stage).
            num_items: trajectories in the global batch, across actor ranks.
            advantage: ``gae_advantages`` (PPO) or ``group_trajectory_advantages`` (GRPO).
        """
        mine = rank_share(num_items, self.rank, self.world_size)
        start = time.perf_counter()
        items: list[Item] = []
        while len(items) < mine:
            got = inp.get_batch_items(mine - len(items))
            if not got:
                raise RuntimeError(f"channel {inp.name!r} closed after {len(items)} of {mine} trajectories.")
            items += got
        trajectories: list[Trajectory] = [it.payload for it in items]
        staleness = max((self.version - tr.version for tr in trajectories), default=0)
        with self.device_lock():
            batch = _flatten(trajectories, advantage(trajectories, self.cfg), self.device)
            metrics = self.update(batch)
        metrics.update(
            {
                "actor/samples": float(len(batch)),
                "actor/staleness": float(staleness),
                "actor/version": float(self.version),
                "time/actor": time.perf_counter() - start,
            }
        )
        return metrics

    def update(self, batch: _Batch) -> dict[str, float]:
        """Minibatch epochs over ``batch``; one version step."""
        cfg = self.cfg
        n = len(batch)
        if n < cfg.minibatches:
            raise ValueError(
                f"actor rank {self.rank} got {n} samples for actor.minibatches={cfg.minibatches}; lower "
                f"actor.minibatches or collect more (env.num_envs x rollout.horizon)."
            )
        lr = cfg.lr * (max(0.0, 1.0 - self.version / self.total_steps) if cfg.lr_schedule == "linear" else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        train_value = cfg.vf_coef > 0 and batch.returns is not None
        names = ("pg_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "grad_norm")
        stats: list[Tensor] = []  # one row of `names` per minibatch, read once at the end
        params = [p for p in self.policy.parameters() if p.requires_grad]
        no_value = torch.zeros((), device=self.device)
        for _ in range(cfg.epochs):
            # one shuffle of the whole batch per epoch; the minibatches are then contiguous slices
            shuffled = _shuffled(batch, torch.randperm(n, generator=self.generator).to(self.device))
            for mb in shuffled.split(cfg.minibatches):
                logp, entropy, values = self.policy.evaluate(mb.obs, mb.actions)
                adv = mb.advantages
                if cfg.normalize_advantages and len(mb) > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg, pm = ppo_clip_loss(logp, mb.logprobs, adv, None, clip_low=cfg.clip, clip_high=cfg.clip)
                entropy_mean = entropy.mean()
                loss = pg - cfg.ent_coef * entropy_mean
                vl = no_value
                if train_value and mb.returns is not None:
                    vl, _ = value_loss(values, mb.values, mb.returns, None, clip=cfg.value_clip)
                    loss = loss + cfg.vf_coef * vl
                self.optimizer.zero_grad(set_to_none=False)
                loss.backward()
                norm = self._step(params)
                stats.append(
                    torch.stack(
                        [pg.detach(), vl.detach(), entropy_mean.detach(), pm["approx_kl"], pm["clip_fraction"], norm]
                    )
                )
        self.version += 1
        means = torch.stack(stats).float().mean(0).tolist()
        out = {f"actor/{k}": v for k, v in zip(names, means, strict=True)}
        out["actor/lr"] = lr
        if batch.returns is not None:
            var = float(batch.returns.var())
            out["actor/explained_variance"] = 1.0 - float((batch.returns - batch.values).var()) / max(var, 1e-8)
        return out

    def _step(self, params: list[nn.Parameter]) -> Tensor:
        """Averages gradients over actor ranks, clips them and steps the optimizer; returns the norm before clipping."""
        if self.world_size > 1:
            import torch.distributed as dist

            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.dist_group())
            flat /= self.world_size
            offset = 0
            for p in params:
                k = p.numel()
                p.grad = flat[offset : offset + k].view_as(p).clone()
                offset += k
        if self.cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        self.optimizer.step()
        return norm.detach()

    # ---- weight sync -----------------------------------------------------------------------------

    def push_weights(self, to: WorkerGroup[PolicyRolloutWorker] | WorkerGroup[EnvWorker]) -> dict[str, float]:
        """Sends the current weights to every rank of ``to`` (from rank 0), tagged with the version:
        policy rollout ranks, or env ranks that act themselves (``EnvWorker.attach_policy``)."""
        load = EnvWorker.load_weights if to.cls is EnvWorker else PolicyRolloutWorker.load_weights
        return self._hand_over(lambda state: send_state(to, load, state, self.version))

    def publish_weights(self, to: WorkerGroup[PolicyRolloutWorker] | WorkerGroup[EnvWorker]) -> dict[str, float]:
        """Puts the current weights, tagged with the version, into each rank of ``to``'s weights channel
        (from rank 0) and returns at once; ``PolicyRolloutWorker.serve(need_version=...)`` (or
        ``EnvWorker.interact(None, ..., need_version=...)`` for env ranks acting themselves) loads them."""
        return self._hand_over(lambda state: publish_state(to, state, self.version))

    def _hand_over(self, deliver: Callable[[dict[str, Tensor]], None]) -> dict[str, float]:
        """Exports the weights and has rank 0 ``deliver`` them."""
        if self.rank != 0:
            return {}
        start = time.perf_counter()
        with self.device_lock():
            state = export_state(self.policy)
        deliver(state)
        return {"time/weight_sync": time.perf_counter() - start}

    def state_dict(self) -> dict[str, Tensor]:
        """Detached CPU copies of the policy weights."""
        with self.device_lock():
            return export_state(self.policy)

    def get_version(self) -> int:
        return self.version

    # ---- context switching -----------------------------------------------------------------------

    def offload(self) -> None:
        """On CUDA moves weights, grads and optimizer state to CPU; on CPU there is nowhere to move them."""
        if self.device.type == "cuda":
            self._move(torch.device("cpu"))

    def onload(self) -> None:
        if self.device.type == "cuda":
            self._move(self.device)

    def _move(self, device: torch.device) -> None:
        move_training_state(self.policy, self.optimizer, device)

    # ---- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, directory: str) -> str:
        """Writes policy, optimizer, version and RNG state to ``directory/actor.pt`` (rank 0)."""
        path = Path(directory)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "policy": self.policy.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "version": self.version,
                    "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate(),
                },
                path / "actor.pt",
            )
        return str(path)

    def load_checkpoint(self, directory: str) -> int:
        """Restores what :meth:`save_checkpoint` wrote; returns the restored version."""
        file = Path(directory) / "actor.pt"
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist; pass a directory written by save_checkpoint.")
        state = torch.load(file, map_location=self.device, weights_only=False)
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        return self.version
