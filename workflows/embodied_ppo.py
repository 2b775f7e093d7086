"""PPO for embodied tasks: vectorised envs and a policy ping-pong stage by stage, then clipped updates with GAE.

How this differs from PPO as in the paper (Schulman et al., 2017) and its common implementations:

- Simulation and inference are separate workers: each env rank's envs are cut into
  ``rollout.stages`` sub-batches that take turns with the policy, so with two stages one half is
  simulated while the policy acts on the other (``rlinf.workers.env``). The trajectories are the
  same as with one batch. With ``rollout.inline`` each env rank acts with its own copy of the
  policy instead (for cheap simulators and small policies, where hand-overs cost more than steps).
- Truncated episodes (time limits) are bootstrapped from the value of their final observation;
  terminated ones are not.
- Advantages are whitened per minibatch; the value loss is unclipped by default
  (``actor.value_clip``); there is no target-KL early stop.
- Each step is on-policy by default: the actor publishes its weights after every update and the
  next rollout waits for them. ``run.rollout_ahead=1`` starts the next rollout as soon as this one
  ends, with weights one update older, so collection overlaps training (the clipped ratio against
  the rollout's log-probs corrects for it; the values that GAE uses come from those weights too).
  With ``run.target_return`` / ``run.target_success`` set, the run stops once the mean over the
  latest ``run.return_window`` episodes reaches it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

from rlinf.channel import Channel
from rlinf.cluster import Cluster
from rlinf.config import dump_yaml
from rlinf.envs import EnvConfig
from rlinf.metrics import MetricsWriter, merge_rank_metrics
from rlinf.models.policies import PolicyConfig, build_policy
from rlinf.placement import Placement, PlacementConfig
from rlinf.workers.embodied import (
    EmbodiedActorConfig,
    EmbodiedActorWorker,
    EmbodiedRolloutConfig,
    EmbodiedRunConfig,
    PolicyRolloutWorker,
    gae_advantages,
)
from rlinf.workers.env import EnvWorker, stage_size

from ._embodied import Rollouts


@dataclass(frozen=True)
class EmbodiedPPOConfig:
    """Every section of an embodied PPO run (YAML and ``key=value`` override these defaults)."""

    env: EnvConfig = field(default_factory=lambda: EnvConfig(kind="gym", id="CartPole-v1", num_envs=16))
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rollout: EmbodiedRolloutConfig = field(default_factory=EmbodiedRolloutConfig)
    actor: EmbodiedActorConfig = field(default_factory=EmbodiedActorConfig)
    run: EmbodiedRunConfig = field(default_factory=lambda: EmbodiedRunConfig(name="embodied-ppo"))
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    def __post_init__(self) -> None:
        self.rollout.check_placement(self.placement)

    @property
    def components(self) -> tuple[str, ...]:
        return self.rollout.components


def main(
    cfg: EmbodiedPPOConfig, run_dir: str | Path, cluster: Cluster | None = None, show_progress: bool = True
) -> dict[str, float]:
    """Runs embodied PPO; writes config.yaml, metrics.jsonl, checkpoints and trace.json into ``run_dir``.

    Returns:
        The last step's metrics plus ``run/steps``, ``run/reached_target`` and ``time/run``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / "config.yaml")
    own = cluster is None
    cluster = cluster or Cluster(cpu_cores_per_slot=cfg.run.cpu_cores_per_slot)
    try:
        place = Placement.from_config(cfg.placement, len(cluster.devices), cfg.components)
        stage_size(cfg.env, place["env"].world_size, cfg.rollout.stages)  # a bad split fails before any launch
        # every group's processes start at once; the policy's and the actor's are built with the env's spaces
        pending_env = EnvWorker.start(cluster, place, name="env")
        pending_rollout = None if cfg.rollout.inline else PolicyRolloutWorker.start(cluster, place, name="rollout")
        pending_actor = EmbodiedActorWorker.start(cluster, place, name="actor")
        env = pending_env.launch(cfg.env, cfg.rollout.stages, cfg.run.return_window)
        spaces = env.on(0).call(EnvWorker.spaces).wait()[0]
        make_policy = functools.partial(build_policy, cfg.policy)
        rollout_built = pending_rollout.construct(make_policy, *spaces, cfg.actor.seed) if pending_rollout else None
        if rollout_built is None:  # rollout.inline: each env rank acts with its own copy of the policy
            env.call(EnvWorker.attach_policy, make_policy, cfg.actor.seed).wait()
        actor = pending_actor.launch(cfg.actor, make_policy, *spaces, cfg.run.steps)
        rollout = rollout_built.wait() if rollout_built is not None else None
        trajectories = Channel(f"{run_dir.name}/trajectories-{time.time_ns()}")
        rollouts = Rollouts(env, rollout, trajectories, cfg.rollout.horizon, cfg.run.rollout_ahead, cfg.run.steps)
        num_items = env.world_size * cfg.rollout.stages
        checkpoints, start, step, last = run_dir / "checkpoints", time.perf_counter(), 0, {}

        with MetricsWriter(run_dir, cfg.run.steps, show_progress) as log:
            log.write(f"{log.note}\n{place}" if log.note else str(place))
            actor.call(EmbodiedActorWorker.publish_weights, rollouts.acting).wait()  # version 0
            rollouts.start(1)
            for step in range(1, cfg.run.steps + 1):
                t0 = time.perf_counter()
                # the actor trains on rollout `step` as its trajectories arrive; with run.rollout_ahead=1
                # rollout step+1 starts as soon as this one ends, by the weights at hand
                training = actor.call(EmbodiedActorWorker.train, trajectories, num_items, gae_advantages)
                collected = rollouts.collect(step)
                trained = merge_rank_metrics(training.wait())
                sync = merge_rank_metrics(actor.call(EmbodiedActorWorker.publish_weights, rollouts.acting).wait())
                last = {**collected, **trained, **sync}
                last["time/step"] = time.perf_counter() - t0
                last["time/run"] = time.perf_counter() - start
                if cfg.run.save_every and step % cfg.run.save_every == 0:
                    actor.on(0).call(EmbodiedActorWorker.save_checkpoint, str(checkpoints / f"step-{step}")).wait()
                log.log(step, last)
                if cfg.run.reached(last):
                    log.write(f"target reached at step {step} after {last['time/run']:.1f} s")
                    break
                rollouts.published(step)
            rollouts.close()
            actor.on(0).call(EmbodiedActorWorker.save_checkpoint, str(checkpoints / "final")).wait()
        cluster.write_trace(run_dir / "trace.json")
        return {**last, "run/steps": float(step), "run/reached_target": float(cfg.run.reached(last))}
    finally:
        if own:
            cluster.shutdown()
