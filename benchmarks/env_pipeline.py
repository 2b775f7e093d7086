"""Env steps/s of the env <-> policy ping-pong: hybrid two-stage pipeline vs collocated synchronous loop.

Two placements of the same ``EnvWorker`` and ``PolicyRolloutWorker``, side by side in one cluster:

    hybrid      envs on CPU slot 0 cut into 2 stages, the policy on slot 1: while one half of the envs
                is simulated the policy acts on the other half
    collocated  envs (1 stage) and the policy on slot 0: they take turns (the synchronous loop)

each measured ``--repeats`` times in alternation; the table shows medians and the hybrid/collocated
ratio. Pipelining hides the cheaper of the two costs, so the ratio approaches 2 only when a step of
simulation and a step of inference cost about the same; it stays near 1 when one dominates. The
table prints both costs, measured alone in a worker on slot 1. Rows:

    CartPole-v1        2048 envs, MLP sized so that acting on one stage's 1024 observations costs
                       about what stepping 1024 envs does (a large-batch policy on a cheap simulator)
    PushCube-v1 state  128 CPU-physics envs and a language-conditioned transformer policy on the
                       state (the ``vla`` kind without an image: pooling, state, instruction and
                       action tokens, ~31 per observation), its width sized the same way: compute-bound,
                       each weight used on thousands of token rows per act, as in a VLA
    PushCube-v1 state  (``pushcube_mlp``, not in the default list) the same envs with an MLP of 3 layers
                       sized the same way: tens of millions of parameters read for 64 rows, so acting
                       is bound by memory traffic, and that traffic slows the physics on the other
                       core (measured: a PushCube step went from ~200 to ~330 ms while a 3x5120 MLP
                       acted on the other core; with the transformer policy it did not change)
    PushCube-v1 state  (``pushcube256``, ``pushcube16``, not in the default list) the transformer row
                       with 256 and 16 envs (256 envs take minutes to create)
    PushCube-v1 state  8 envs, 64x64 MLP: the policy costs next to nothing beside the physics

The policy width is chosen at start-up from a ladder of widths, refined in steps of 8 (the widest
whose act on one stage fits in ``FIT`` of one stage's simulation), because the two costs shift
differently with the machine and its load. Both costs are measured in a worker process on the
policy's CPU slot, where the policy will run: the same CartPole act on 1,024 observations took
14.5-17 ms there against 12.6-13.7 ms in a bare process (the worker shares its core with the
cluster's own processes), so sizing in the launching process overshot, and the hybrid run then
waited on the policy. The two stages also slow each other when they run side by side on the two
cores (beside the simulation the PushCube transformer's act took 5-29% longer than alone, CartPole's
MLP's 10-25%; CartPole's envs stepped ~15% slower beside the MLP), which the synchronous loop, using
one core at a time, does not pay; ``FIT`` leaves the act a little short of the simulation so that
neither side waits much.

    python benchmarks/env_pipeline.py [--repeats 3] [--steps 40]
        [--tasks cartpole,pushcube,pushcube256,pushcube16,pushcube_small]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from rlinf import Cluster
from rlinf.envs import EnvConfig, make_env
from rlinf.models.policies import PolicyConfig, build_policy
from rlinf.worker import Worker
from rlinf.workers.embodied import PolicyRolloutWorker
from rlinf.workers.env import EnvWorker, merge_env_metrics

# ~10% apart (multiples of 32): the width picked leaves a stage's act within ~20% of a stage's simulation
WIDTHS = tuple(sorted({round(64 * 1.1**k / 32) * 32 for k in range(49)}))  # 64 .. 6208
FIT = 0.95  # of one stage's simulation that one stage's act may take, measured alone (see the docstring)
PUSHCUBE = EnvConfig(
    kind="maniskill", id="PushCube-v1", num_envs=8, control_mode="pd_ee_delta_pos", vectorization="loop"
)


def mlp_of_depth(depth: int) -> Callable[[PolicyConfig, int], PolicyConfig]:
    """Sizes an MLP: ``depth`` hidden layers of the given width."""
    return lambda cfg, width: replace(cfg, hidden_sizes=(width,) * depth)


def transformer_of_width(cfg: PolicyConfig, width: int) -> PolicyConfig:
    """Sizes the transformer policy: its token width."""
    return replace(cfg, d_model=width)


@dataclass(frozen=True)
class Task:
    """One row: an env, and a fixed policy or a policy to size against the simulator."""

    name: str
    env: EnvConfig
    policy: PolicyConfig
    sized: Callable[[PolicyConfig, int], PolicyConfig] | None = None  # None: use ``policy`` as it is
    steps_scale: float = 1.0  # fewer steps for slow simulators


# language-conditioned transformer on PushCube's state: 4 layers; its width is sized at start-up
TRANSFORMER = PolicyConfig(kind="vla", num_layers=4, num_heads=4, instruction="push the cube to the goal")
TASKS = {
    "cartpole": Task(
        "CartPole-v1", EnvConfig(kind="gym", id="CartPole-v1", num_envs=2048), PolicyConfig(), mlp_of_depth(2)
    ),
    "pushcube": Task(
        "PushCube-v1 state", replace(PUSHCUBE, num_envs=128), TRANSFORMER, transformer_of_width, steps_scale=0.25
    ),
    "pushcube_mlp": Task(
        "PushCube-v1 state", replace(PUSHCUBE, num_envs=128), PolicyConfig(), mlp_of_depth(3), steps_scale=0.25
    ),
    "pushcube256": Task(
        "PushCube-v1 state", replace(PUSHCUBE, num_envs=256), TRANSFORMER, transformer_of_width, steps_scale=0.2
    ),
    "pushcube16": Task(
        "PushCube-v1 state", replace(PUSHCUBE, num_envs=16), TRANSFORMER, transformer_of_width, steps_scale=0.5
    ),
    "pushcube_small": Task("PushCube-v1 state", PUSHCUBE, PolicyConfig(hidden_sizes=(64, 64)), steps_scale=0.5),
}


def _ms(fn: Any, n: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e3


def size_policy(task: Task, n: int = 10) -> tuple[PolicyConfig, float, float, float]:
    """The task's policy (sized against the simulator when asked) and the milliseconds of one step of
    all envs, of one act on all their observations and of one act on half of them (one stage's share
    with S=2), measured alone in the calling process (one thread per CPU slot in a worker).

    The width is the widest whose act on one stage's observations costs at most ``FIT`` of one stage's
    simulation: pipelining hides a stage's act behind the other stage's simulation, all of it up to
    that width and less and less beyond. (A small batch keeps a wide MLP memory-bound, so half the
    observations need not cost half the time, and overshooting costs twice.)
    """
    env = make_env(task.env)
    obs, _ = env.reset(seed=0)
    half = obs[: task.env.num_envs // 2]
    actions = build_policy(task.policy, env.observation_space, env.action_space).act(obs)[0].numpy()
    sim = _ms(lambda: env.step(actions), n)
    cfg = task.policy
    if task.sized is not None:
        sized = task.sized

        def fits(width: int) -> bool:
            policy = build_policy(sized(task.policy, width), env.observation_space, env.action_space)
            return _ms(lambda: policy.act(half), n) <= FIT * sim / 2

        # the ladder, then steps of 8 between the widest that fits and the next one up (~2% apart)
        best, above = WIDTHS[0], WIDTHS[-1]
        for width in WIDTHS:
            if not fits(width):
                above = width
                break
            best = width
        for width in range(best + 8, above, 8):
            if not fits(width):
                break
            best = width
        cfg = sized(task.policy, best)
    policy = build_policy(cfg, env.observation_space, env.action_space)
    act, act_half = _ms(lambda: policy.act(obs), n), _ms(lambda: policy.act(half), n)
    env.close()
    return cfg, sim, act, act_half


class Sizer(Worker):
    """Runs :func:`size_policy` in a worker process on the slot the policy will use."""

    def size(self, task: Task) -> tuple[PolicyConfig, float, float, float]:
        return size_policy(task)


def describe(cfg: PolicyConfig) -> str:
    if cfg.kind == "vla":
        return f"transformer {cfg.num_layers}x{cfg.d_model}"
    return f"{cfg.kind} {list(cfg.hidden_sizes)}"


def rollout_rate(env: Any, policy: Any, env_inboxes: list, policy_inboxes: list, steps: int) -> float:
    serving = policy.call(PolicyRolloutWorker.serve, env_inboxes)
    metrics = merge_env_metrics(env.call(EnvWorker.interact, policy_inboxes, None, steps).wait())
    serving.wait()
    return metrics["env/steps"] / metrics["time/env_rollout"]


def bench_task(cluster: Cluster, key: str, task: Task, repeats: int, steps: int) -> dict[str, Any]:
    sizer = Sizer.launch(cluster, [1], name=f"sizer-{key}")
    policy_cfg, sim_ms, act_ms, half_ms = sizer.call(Sizer.size, task).wait()[0]
    sizer.kill()
    cluster.groups.remove(sizer)
    probe = make_env(EnvConfig(kind=task.env.kind, id=task.env.id, num_envs=1, control_mode=task.env.control_mode))
    spaces = (probe.observation_space, probe.action_space)
    probe.close()
    make_policy = functools.partial(build_policy, policy_cfg)
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
        "policy": describe(policy_cfg),
        "sim_ms_per_step": sim_ms,
        "policy_ms_per_step": act_ms,
        "policy_ms_per_half_step": half_ms,
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
    parser.add_argument("--tasks", default="cartpole,pushcube,pushcube_small")
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
        "policy ms/half",
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
            f"{r['policy_ms_per_half_step']:.1f}",
            f"{r['hybrid_steps_per_s']:.0f}",
            f"{r['collocated_steps_per_s']:.0f}",
            f"{r['ratio']:.2f}x",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print(
        f"\nmedians of {args.repeats} runs (sim and policy costs, measured alone in a worker on slot 1: one step of"
        " all envs, one act on all their observations, one act on half of them)"
    )
    for j, row in enumerate([header, *rows]):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
