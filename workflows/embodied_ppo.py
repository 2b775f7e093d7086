"""PPO for embodied tasks: vectorised envs and a policy ping-pong stage by stage, then clipped updates with GAE.

How this differs from PPO as in the paper (Schulman et al., 2017) and its common implementations:

- Simulation and inference are separate workers: each env rank's envs are cut into
  ``rollout.stages`` sub-batches that take turns with the policy, so with two stages one half is
  simulated while the policy acts on the other (``rlinf.workers.env``). The trajectories are the
  same as with one batch.
- Truncated episodes (time limits) are bootstrapped from the value of their final observation;
  terminated ones are not.
- Advantages are whitened per minibatch; the value loss is unclipped by default
  (``actor.value_clip``); there is no target-KL early stop.
- Each step is fully on-policy: weights are pushed to the rollout worker before every rollout.
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
from rlinf.workers.env import EnvWorker, merge_env_metrics, stage_size


@dataclass(frozen=True)
class EmbodiedPPOConfig:
    """Every section of an embodied PPO run (YAML and ``key=value`` override these defaults)."""

    env: EnvConfig = field(default_factory=lambda: EnvConfig(kind="gym", id="CartPole-v1", num_envs=16))
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    rollout: EmbodiedRolloutConfig = field(default_factory=EmbodiedRolloutConfig)
    actor: EmbodiedActorConfig = field(default_factory=EmbodiedActorConfig)
    run: EmbodiedRunConfig = field(default_factory=lambda: EmbodiedRunConfig(name="embodied-ppo"))
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    @property
    def components(self) -> tuple[str, ...]:
        return ("env", "rollout", "actor")


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
        env = EnvWorker.launch(cluster, place, cfg.env, cfg.rollout.stages, cfg.run.return_window, name="env")
        spaces = env.on(0).call(EnvWorker.spaces).wait()[0]
        make_policy = functools.partial(build_policy, cfg.policy)
        rollout = PolicyRolloutWorker.launch(cluster, place, make_policy, *spaces, cfg.actor.seed, name="rollout")
        actor = EmbodiedActorWorker.launch(cluster, place, cfg.actor, make_policy, *spaces, cfg.run.steps, name="actor")
        env_inboxes = env.call(EnvWorker.inbox).wait()
        policy_inboxes = rollout.call(PolicyRolloutWorker.inbox).wait()
        trajectories = Channel(f"{run_dir.name}/trajectories-{time.time_ns()}")
        num_items = env.world_size * cfg.rollout.stages
        checkpoints, start, step, last = run_dir / "checkpoints", time.perf_counter(), 0, {}

        with MetricsWriter(run_dir, cfg.run.steps, show_progress) as log:
            log.write(f"{log.note}\n{place}" if log.note else str(place))
            for step in range(1, cfg.run.steps + 1):
                t0 = time.perf_counter()
                sync = actor.call(EmbodiedActorWorker.push_weights, rollout).wait()
                handles = [  # launched together: envs and policy ping-pong, the actor trains on what arrives
                    rollout.call(PolicyRolloutWorker.serve, env_inboxes),
                    actor.call(EmbodiedActorWorker.train, trajectories, num_items, gae_advantages),
                ]
                env_metrics = merge_env_metrics(
                    env.call(EnvWorker.interact, policy_inboxes, trajectories, cfg.rollout.horizon).wait()
                )
                last = {**merge_rank_metrics([m for h in handles for m in h.wait()] + sync), **env_metrics}
                last["time/step"] = time.perf_counter() - t0
                last["time/run"] = time.perf_counter() - start
                last["env/steps_per_s"] = env_metrics["env/steps"] / env_metrics["time/env_rollout"]
                if cfg.run.save_every and step % cfg.run.save_every == 0:
                    actor.on(0).call(EmbodiedActorWorker.save_checkpoint, str(checkpoints / f"step-{step}")).wait()
                log.log(step, last)
                if cfg.run.reached(last):
                    log.write(f"target reached at step {step} after {last['time/run']:.1f} s")
                    break
            actor.on(0).call(EmbodiedActorWorker.save_checkpoint, str(checkpoints / "final")).wait()
        cluster.write_trace(run_dir / "trace.json")
        return {**last, "run/steps": float(step), "run/reached_target": float(cfg.run.reached(last))}
    finally:
        if own:
            cluster.shutdown()
