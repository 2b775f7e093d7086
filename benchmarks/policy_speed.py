"""Forward and forward+backward throughput of each policy kind at typical batch sizes, on this CPU.

For sizing the env <-> policy pipeline: ``act`` (no gradients) is what a rollout worker pays per env
step; ``evaluate`` + ``backward`` is what an actor worker pays per training sample. Spaces mirror the
envs here: a PushCube-like state (25 floats, 4 continuous actions) for the MLP, RGB images with the
state for the CNN and the VLA (7 bins-per-dimension actions for the VLA, Gaussian for the CNN).
Each number is the median of --repeats timed runs of --iters calls, in samples per second of wall
time and per second of this process's CPU time; on a shared machine the second is the steadier one
(with one thread it is the speed on an idle core).

    python benchmarks/policy_speed.py [--threads 1] [--repeats 5] [--iters 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from rlinf.models import PolicyConfig, build_policy

STATE = gym.spaces.Box(-np.inf, np.inf, (25,), np.float32)
ACTION = gym.spaces.Box(-1.0, 1.0, (4,), np.float32)


def rgb_space(side: int) -> gym.spaces.Dict:
    return gym.spaces.Dict({"state": STATE, "rgb": gym.spaces.Box(0, 255, (side, side, 3), np.uint8)})


# (name, config, observation space, batch sizes)
CASES: list[tuple[str, PolicyConfig, gym.Space[Any], tuple[int, ...]]] = [
    ("mlp 64x64", PolicyConfig(kind="mlp"), STATE, (16, 256, 1024)),
    ("mlp 256x256", PolicyConfig(kind="mlp", hidden_sizes=(256, 256), activation="relu"), STATE, (16, 256, 1024)),
    ("cnn 64px", PolicyConfig(kind="cnn"), rgb_space(64), (16, 64, 256)),
    ("cnn 128px", PolicyConfig(kind="cnn"), rgb_space(128), (16, 64, 256)),
    (
        "vla 64px",
        PolicyConfig(kind="vla", patch_size=8, instruction="push the cube to the goal"),
        rgb_space(64),
        (16, 64),
    ),
    ("vla 128px", PolicyConfig(kind="vla", instruction="push the cube to the goal"), rgb_space(128), (16, 64)),
]


def sample(space: gym.Space[Any], n: int) -> Any:
    if isinstance(space, gym.spaces.Dict):
        return {k: torch.as_tensor(np.stack([s.sample() for _ in range(n)])) for k, s in space.spaces.items()}
    return torch.as_tensor(np.stack([space.sample() for _ in range(n)]))


def timed(fn: Any, iters: int, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds per call over ``repeats`` runs of ``iters`` calls (after a warm-up call)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(iters):
            fn()
        wall.append((time.perf_counter() - start) / iters)
        cpu.append((time.process_time() - start_cpu) / iters)
    return statistics.median(wall), statistics.median(cpu)


def bench(repeats: int, iters: int) -> list[dict[str, Any]]:
    print(
        f"{'policy':<11} {'params':>6} {'batch':>6} {'act/s':>10} {'act/cpu-s':>10} {'train/s':>10} {'train/cpu-s':>10}"
    )
    print("(samples per second; train = evaluate + backward)")
    rows = []
    for name, cfg, obs_space, batches in CASES:
        torch.manual_seed(0)
        policy = build_policy(cfg, obs_space, ACTION)
        params = sum(p.numel() for p in policy.parameters())
        for b in batches:
            obs = sample(obs_space, b)
            actions, _, _ = policy.act(obs)

            def train_step(obs: Any = obs, actions: torch.Tensor = actions, policy: Any = policy) -> None:
                logp, entropy, values = policy.evaluate(obs, actions)
                (-logp.mean() - 0.01 * entropy.mean() + values.pow(2).mean()).backward()
                policy.zero_grad(set_to_none=True)

            fwd, fwd_cpu = timed(lambda obs=obs, policy=policy: policy.act(obs), iters, repeats)
            bwd, bwd_cpu = timed(train_step, iters, repeats)
            row = {
                "policy": name,
                "params": params,
                "batch": b,
                "act_per_s": b / fwd,
                "act_per_cpu_s": b / fwd_cpu,
                "train_per_s": b / bwd,
                "train_per_cpu_s": b / bwd_cpu,
            }
            rows.append(row)
            print(
                f"{name:<11} {params / 1e6:5.2f}M {b:6d} {row['act_per_s']:10.0f} {row['act_per_cpu_s']:10.0f} "
                f"{row['train_per_s']:10.0f} {row['train_per_cpu_s']:10.0f}",
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one per CPU slot a worker owns)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} x {args.iters} calls")
    rows = bench(args.repeats, args.iters)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
