"""Wall time for PPO to reach a mean return of 475 on CartPole-v1: rlinf vs stable-baselines3, side by side.

For each seed, in alternation on the same machine:

    rlinf   ``rlinf.workflows.embodied_ppo`` with examples/embodied_ppo_cartpole.yaml (envs on CPU slot
            0, acting with their own copy of the policy; the actor on slot 1; the next rollout
            collected while the actor trains),
            stopping once the mean return of the latest 32 episodes reaches 475
    sb3     stable-baselines3 PPO, stopping on the same criterion (its episode buffer, latest 32
            episodes), in this process with one torch thread (faster than the default for this small
            MLP), with each of two settings (``--sb3``):
              zoo    the RL Zoo's tuned CartPole-v1 hyperparameters (8 envs, n_steps 32, batch 256,
                     20 epochs, gamma 0.98, GAE lambda 0.8, linear lr 1e-3 and clip 0.2, 1e5 steps)
              rlinf  the rlinf example's (64 envs, n_steps 32, batch 512, 6 epochs, constant clip 0.2,
                     the same gamma, lambda and lr decaying over 307,200 steps)

rlinf's time is reported twice: the training loop alone (from its first rollout) and the whole
``main`` call (launching the worker groups, training, the final checkpoint and the trace). Starting
the embedded Ray itself happens once per process and is reported on its own line. Medians over seeds.

    pip install -e '.[bench]'        # stable-baselines3
    python benchmarks/cartpole_vs_sb3.py [--seeds 0,1,2] [--sb3 zoo,rlinf] [--json out.json]
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


# stable-baselines3 PPO settings: the RL Zoo's tuned ones for CartPole-v1, and rlinf's example's
# (64 envs x 32 steps, 6 epochs of 4 minibatches of 512, constant clip, lr decaying over 150 rollouts)
SB3_SETTINGS: dict[str, dict[str, Any]] = {
    "zoo": {"n_envs": 8, "n_steps": 32, "batch_size": 256, "n_epochs": 20, "clip_decay": True, "timesteps": 100_000},
    "rlinf": {"n_envs": 64, "n_steps": 32, "batch_size": 512, "n_epochs": 6, "clip_decay": False, "timesteps": 307_200},
}


def run_sb3(seed: int, settings: str = "zoo") -> dict[str, float]:
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

    s = SB3_SETTINGS[settings]
    # One torch thread, as each rlinf worker uses: with a 64x64 MLP more threads only add
    # synchronisation (on a busy 2-core machine SB3 ran several times slower with the default of 2).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    env = make_vec_env("CartPole-v1", n_envs=s["n_envs"], seed=seed)
    model = PPO(
        "MlpPolicy",
        env,
        n_steps=s["n_steps"],
        batch_size=s["batch_size"],
        gae_lambda=0.8,
        gamma=0.98,
        n_epochs=s["n_epochs"],
        ent_coef=0.0,
        learning_rate=linear(1e-3),
        clip_range=linear(0.2) if s["clip_decay"] else 0.2,
        seed=seed,
        verbose=0,
        device="cpu",
    )
    stop = StopAtTarget()
    model.learn(total_timesteps=s["timesteps"], callback=stop)
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
    parser.add_argument("--sb3", default="zoo,rlinf", help=f"SB3 settings to run, of {sorted(SB3_SETTINGS)}")
    parser.add_argument("--json", default=None)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the rlinf example config")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [s for s in args.sb3.split(",") if s]
    unknown = [s for s in settings if s not in SB3_SETTINGS]
    if unknown:
        parser.error(f"--sb3 {unknown[0]!r} is not one of {sorted(SB3_SETTINGS)}")

    from rlinf import Cluster

    start = time.perf_counter()
    cluster = Cluster()
    ray_s = time.perf_counter() - start
    rows: list[tuple[int, dict[str, float], dict[str, dict[str, float]]]] = []
    try:
        for seed in seeds:
            ours = run_rlinf(cluster, seed, args.overrides)
            theirs = {name: run_sb3(seed, name) for name in settings}
            rows.append((seed, ours, theirs))
            print(f"seed {seed}: rlinf {ours}  sb3 {theirs}", flush=True)
    finally:
        cluster.shutdown()

    def med(values: list[float]) -> float:
        return statistics.median(values)

    print(f"\nCartPole-v1 PPO, wall time to a mean return >= {TARGET:.0f} over the latest {WINDOW} episodes")
    print(f"(embedded Ray start, once per process: {ray_s:.1f} s, not counted below)\n")
    head = ["seed", "rlinf train s", "rlinf total s", "rlinf steps"]
    for name in settings:
        head += [f"sb3 {name} s", f"sb3 {name} steps"]
    print("  ".join(f"{h:>14}" for h in head))
    for seed, ours, theirs in rows:
        cells = [f"{seed}", f"{ours['train_s']:.1f}", f"{ours['total_s']:.1f}", f"{ours['env_steps']:.0f}"]
        for name in settings:
            cells += [f"{theirs[name]['total_s']:.1f}", f"{theirs[name]['env_steps']:.0f}"]
        reached = ours["reached"] and all(t["reached"] for t in theirs.values())
        print("  ".join(f"{c:>14}" for c in cells) + ("" if reached else "  (target not reached by one side)"))
    ours_train = med([r[1]["train_s"] for r in rows])
    ours_total = med([r[1]["total_s"] for r in rows])
    cells = ["median", f"{ours_train:.1f}", f"{ours_total:.1f}", f"{med([r[1]['env_steps'] for r in rows]):.0f}"]
    sb3 = {name: med([r[2][name]["total_s"] for r in rows]) for name in settings}
    for name in settings:
        cells += [f"{sb3[name]:.1f}", f"{med([r[2][name]['env_steps'] for r in rows]):.0f}"]
    print("  ".join(f"{c:>14}" for c in cells))
    for name in settings:
        print(
            f"\nrlinf / sb3 ({name} settings) wall time: training loop {ours_train / sb3[name]:.2f}x, "
            f"whole run {ours_total / sb3[name]:.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            runs = [{"seed": s, "rlinf": o, "sb3": t} for s, o, t in rows]
            json.dump({"ray_start_s": ray_s, "runs": runs}, f)


if __name__ == "__main__":
    main()
