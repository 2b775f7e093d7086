"""Wall time for PPO to reach a mean return of 475 on CartPole-v1: rlinf vs stable-baselines3, side by side.

For each seed, in alternation on the same machine:

    rlinf   ``rlinf.workflows.embodied_ppo`` with examples/embodied_ppo_cartpole.yaml (envs on CPU slot 0,
            policy and actor on slot 1, two stages), stopping once the mean return of the latest 32
            episodes reaches 475
    sb3     stable-baselines3 PPO with the RL Zoo's tuned CartPole-v1 hyperparameters (8 envs, n_steps 32,
            batch 256, 20 epochs, gamma 0.98, GAE lambda 0.8, linear lr 1e-3 and clip 0.2, 1e5 steps),
            stopping on the same criterion (its episode buffer, latest 32 episodes), in this process
            with one torch thread (faster than the default for this small MLP)

rlinf's time is reported twice: the training loop alone (from its first rollout) and the whole
``main`` call (launching the three workers, training, the final checkpoint and the trace). Starting
the embedded Ray itself happens once per process and is reported on its own line. Medians over seeds.

    pip install -e '.[bench]'        # stable-baselines3
    python benchmarks/cartpole_vs_sb3.py [--seeds 0,1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TARGET = 475.0
WINDOW = 32
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embodied_ppo_cartpole.yaml"


def run_rlinf(cluster: Any, seed: int, overrides: list[str]) -> dict[str, float]:
    from rlinf.config import load_config
    from rlinf.workflows.embodied_ppo import EmbodiedPPOConfig, main

    cfg = load_config(
        EmbodiedPPOConfig,
        EXAMPLE,
        [f"env.seed={seed * 1000}", f"actor.seed={seed}", f"run.target_return={TARGET}", *overrides],
    )
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = main(cfg, Path(tmp) / "run", cluster=cluster, show_progress=False)
        total = time.perf_counter() - start
        records = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    for g in list(cluster.groups):
        g.kill()
        cluster.groups.remove(g)
    return {
        "reached": out["run/reached_target"],
        "train_s": out["time/run"],
        "total_s": total,
        "env_steps": sum(r["env/steps"] for r in records),
        "final_return": out["env/return_window"],
    }


def run_sb3(seed: int) -> dict[str, float]:
    import numpy as np
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    def linear(start: float) -> Callable[[float], float]:
        return lambda progress_remaining: progress_remaining * start

    class StopAtTarget(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.reached = False

        def _on_step(self) -> bool:
            buf = self.model.ep_info_buffer
            if buf is not None and len(buf) >= WINDOW:
                last = [ep["r"] for ep in list(buf)[-WINDOW:]]
                if float(np.mean(last)) >= TARGET:
                    self.reached = True
                    return False
            return True

    # One torch thread, as each rlinf worker uses: with a 64x64 MLP more threads only add
    # synchronisation (on a busy 2-core machine SB3 ran several times slower with the default of 2).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=32,
        batch_size=256,
        gae_lambda=0.8,
        gamma=0.98,
        n_epochs=20,
        ent_coef=0.0,
        learning_rate=linear(1e-3),
        clip_range=linear(0.2),
        seed=seed,
        verbose=0,
        device="cpu",
    )
    stop = StopAtTarget()
    model.learn(total_timesteps=100_000, callback=stop)
    elapsed = time.perf_counter() - start
    torch.set_num_threads(threads)
    buf = [ep["r"] for ep in list(model.ep_info_buffer or [])[-WINDOW:]]
    return {
        "reached": float(stop.reached),
        "total_s": elapsed,
        "env_steps": float(model.num_timesteps),
        "final_return": float(np.mean(buf)) if buf else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the rlinf example config")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    from rlinf import Cluster

    start = time.perf_counter()
    cluster = Cluster()
    ray_s = time.perf_counter() - start
    rows: list[tuple[int, dict[str, float], dict[str, float]]] = []
    try:
        for seed in seeds:
            ours = run_rlinf(cluster, seed, args.overrides)
            theirs = run_sb3(seed)
            rows.append((seed, ours, theirs))
            print(f"seed {seed}: rlinf {ours}  sb3 {theirs}", flush=True)
    finally:
        cluster.shutdown()

    def med(side: int, key: str) -> float:
        return statistics.median((r[1] if side == 1 else r[2])[key] for r in rows)

    print(f"\nCartPole-v1 PPO, wall time to a mean return >= {TARGET:.0f} over the latest {WINDOW} episodes")
    print(f"(embedded Ray start, once per process: {ray_s:.1f} s, not counted below)\n")
    head = ("seed", "rlinf train s", "rlinf total s", "rlinf steps", "sb3 s", "sb3 steps")
    print(f"{head[0]:>4}  {head[1]:>13}  {head[2]:>13}  {head[3]:>11}  {head[4]:>7}  {head[5]:>9}")
    for seed, ours, theirs in rows:
        flag = "" if ours["reached"] and theirs["reached"] else "  (target not reached by one side)"
        print(
            f"{seed:>4}  {ours['train_s']:>13.1f}  {ours['total_s']:>13.1f}  {ours['env_steps']:>11.0f}  "
            f"{theirs['total_s']:>7.1f}  {theirs['env_steps']:>9.0f}{flag}"
        )
    ours_train, ours_total, sb3 = med(1, "train_s"), med(1, "total_s"), med(2, "total_s")
    print(
        f"{'med':>4}  {ours_train:>13.1f}  {ours_total:>13.1f}  {med(1, 'env_steps'):>11.0f}  {sb3:>7.1f}  "
        f"{med(2, 'env_steps'):>9.0f}"
    )
    print(f"\nrlinf / sb3 wall time: training loop {ours_train / sb3:.2f}x, whole run {ours_total / sb3:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ray_start_s": ray_s, "runs": [{"seed": s, "rlinf": o, "sb3": t} for s, o, t in rows]}, f)


if __name__ == "__main__":
    main()
