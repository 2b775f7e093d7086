"""Env steps/s of the env <-> policy ping-pong: hybrid two-stage pipeline vs collocated synchronous loop.

Two placements of the same ``EnvWorker`` and ``PolicyRolloutWorker``, side by side in one cluster:

    hybrid      envs on CPU slot 0 cut into 2 stages, the policy on slot 1: while one half of the envs
                is simulated the policy acts on the other half
    collocated  envs (1 stage) and the policy on slot 0: they take turns (the synchronous loop)

for CartPole-v1 and ManiSkill PushCube-v1 (state observations), each placement measured ``--repeats``
times in alternation; the table shows medians and the hybrid/collocated ratio. Pipelining can at
best hide the cheaper of the two costs, so the ratio approaches 2 only when a step of simulation and
a step of inference cost about the same. The defaults are chosen that way and the table prints both
costs measured alone: CartPole with 256 envs and a 256x256 MLP (a large-batch policy on a cheap
simulator), PushCube with 8 CPU-physics envs and a 3x1536 MLP (about 10 M parameters, the size of a
small action head on a robot-control task). With a tiny MLP on PushCube the policy costs next to
nothing beside the physics and the ratio is close to 1.

    python benchmarks/env_pipeline.py [--repeats 3] [--steps 40] [--tasks cartpole,pushcube] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from rlinf import Cluster
from rlinf.envs import EnvConfig, make_env
from rlinf.models.policies import PolicyConfig, build_policy
from rlinf.workers.embodied import PolicyRolloutWorker
from rlinf.workers.env import EnvWorker, merge_env_metrics


@dataclass(frozen=True)
class Task:
    name: str
    env: EnvConfig
    policy: PolicyConfig
    steps_scale: float = 1.0  # fewer steps for slow simulators


TASKS = {
    "cartpole": Task(
        "CartPole-v1",
        EnvConfig(kind="gym", id="CartPole-v1", num_envs=256, seed=0),
        PolicyConfig(kind="mlp", hidden_sizes=(256, 256)),
    ),
    "pushcube": Task(
        "PushCube-v1 state",
        EnvConfig(kind="maniskill", id="PushCube-v1", num_envs=8, control_mode="pd_ee_delta_pos", vectorization="loop"),
        PolicyConfig(kind="mlp", hidden_sizes=(1536, 1536, 1536)),
        steps_scale=0.5,
    ),
}


def alone_costs(task: Task, n: int = 20) -> tuple[float, float]:
    """Milliseconds of one env step of all envs, and of one policy act on all observations, in this process."""
    torch.set_num_threads(1)
    env = make_env(task.env)
    policy = build_policy(task.policy, env.observation_space, env.action_space)
    obs, _ = env.reset(seed=0)
    actions = policy.act(obs)[0].numpy()
    env.step(actions)
    start = time.perf_counter()
    for _ in range(n):
        env.step(actions)
    sim = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for _ in range(n):
        policy.act(obs)
    act = (time.perf_counter() - start) / n
    env.close()
    return sim * 1e3, act * 1e3


def rollout_rate(env: Any, policy: Any, env_inboxes: list, policy_inboxes: list, steps: int) -> float:
    serving = policy.call(PolicyRolloutWorker.serve, env_inboxes)
    metrics = merge_env_metrics(env.call(EnvWorker.interact, policy_inboxes, None, steps).wait())
    serving.wait()
    return metrics["env/steps"] / metrics["time/env_rollout"]


def bench_task(cluster: Cluster, key: str, task: Task, repeats: int, steps: int) -> dict[str, Any]:
    sim_ms, act_ms = alone_costs(task)
    probe = make_env(EnvConfig(kind=task.env.kind, id=task.env.id, num_envs=1, control_mode=task.env.control_mode))
    spaces = (probe.observation_space, probe.action_space)
    probe.close()
    make_policy = functools.partial(build_policy, task.policy)
    setups = {
        "hybrid (S=2, 2 slots)": ([0], 2, [1]),
        "collocated (S=1, 1 slot)": ([0], 1, [0]),
    }
    groups = {}
    for label, (env_dev, stages, pol_dev) in setups.items():
        tag = f"{key}-{stages}"
        env = EnvWorker.launch(cluster, env_dev, task.env, stages, name=f"env-{tag}")
        pol = PolicyRolloutWorker.launch(cluster, pol_dev, make_policy, *spaces, 0, name=f"policy-{tag}")
        inboxes = (env.call(EnvWorker.inbox).wait(), pol.call(PolicyRolloutWorker.inbox).wait())
        rollout_rate(env, pol, *inboxes, 3)  # warm-up
        groups[label] = (env, pol, inboxes)
    n = max(4, int(steps * task.steps_scale))
    rates: dict[str, list[float]] = {label: [] for label in setups}
    for _ in range(repeats):
        for label, (env, pol, inboxes) in groups.items():
            rates[label].append(rollout_rate(env, pol, *inboxes, n))
    for env, pol, _ in groups.values():
        for g in (env, pol):
            g.kill()
            cluster.groups.remove(g)
    med = {label: statistics.median(r) for label, r in rates.items()}
    hybrid, colloc = med["hybrid (S=2, 2 slots)"], med["collocated (S=1, 1 slot)"]
    return {
        "task": task.name,
        "num_envs": task.env.num_envs,
        "policy": f"{task.policy.kind} {list(task.policy.hidden_sizes)}",
        "sim_ms_per_step": sim_ms,
        "policy_ms_per_step": act_ms,
        "steps_per_rollout": n,
        "rates": rates,
        "hybrid_steps_per_s": hybrid,
        "collocated_steps_per_s": colloc,
        "ratio": hybrid / colloc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="policy steps per env and measurement")
    parser.add_argument("--tasks", default="cartpole,pushcube")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = []
    with Cluster() as cluster:
        if len(cluster.devices) < 2:
            raise SystemExit("this benchmark needs 2 devices (CPU slots or GPUs); the cluster has 1.")
        for key in args.tasks.split(","):
            if key not in TASKS:
                raise SystemExit(f"unknown task {key!r}; choose from {', '.join(TASKS)}.")
            results.append(bench_task(cluster, key, TASKS[key], args.repeats, args.steps))
            r = results[-1]
            print(f"{r['task']}: {r['rates']}", flush=True)
    header = (
        "task",
        "envs",
        "policy",
        "sim ms/step",
        "policy ms/step",
        "hybrid S=2 steps/s",
        "colloc S=1 steps/s",
        "ratio",
    )
    rows = [
        (
            r["task"],
            str(r["num_envs"]),
            r["policy"],
            f"{r['sim_ms_per_step']:.1f}",
            f"{r['policy_ms_per_step']:.1f}",
            f"{r['hybrid_steps_per_s']:.0f}",
            f"{r['collocated_steps_per_s']:.0f}",
            f"{r['ratio']:.2f}x",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(f"\nmedians of {args.repeats} runs (sim and policy costs: one step of all envs, measured alone)")
    for j, row in enumerate([header, *rows]):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
