"""GRPO on the math task with the tiny model in three placements on two CPU slots, side by side.

Same workflow (``rlinf.workflows.grpo``) and config (``examples/grpo_math_tiny.yaml``); only the
``placement`` section changes. Three components on two slots cannot be pairwise disjoint, so:

    collocated     rollout, reward and actor each on slots 0-1 with one rank per slot; on each slot
                   the components take turns through the device lock (the actor trains with DDP)
    disaggregated  generation on slot 0 (rollout, plus the reward, which verifies with rules and never
                   takes a device lock), training on slot 1 (actor): generation and training never
                   wait for each other's devices. Written as mode ``hybrid``, since the reward shares
                   slot 0 with the rollout
    hybrid         rollout on slots 0-1 (two ranks), reward on slot 0, actor on slot 1: the second
                   rollout rank takes turns with the actor on slot 1

Every mode runs the same steps; the modes run interleaved in every repeat. A run's iteration time
is the median ``time/step`` over its steps after the first (which warms up); the table shows the
median over ``--repeats`` runs, and each mode's stage summary over those steps, from the trace of
its median run.

    python benchmarks/grpo_modes.py [--repeats 3] [--steps 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path
from textwrap import indent
from typing import Any

from rlinf import Cluster
from rlinf.config import load_config
from rlinf.timeline import CATEGORIES, clip_tracks, format_summary, iteration_windows, read_chrome_trace, stage_summary
from rlinf.workflows import grpo

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "grpo_math_tiny.yaml"

MODES: dict[str, tuple[str, list[str]]] = {
    "collocated": (
        "all on 0-1, 2 ranks each",
        [
            "placement.mode=collocated",
            "placement.components.rollout.devices=0-1",
            "placement.components.reward.devices=0-1",
            "placement.components.actor.devices=0-1",
        ],
    ),
    "disaggregated": (
        "rollout+reward 0 | actor 1",
        [
            "placement.mode=hybrid",
            "placement.components.rollout.devices=0",
            "placement.components.reward.devices=0",
            "placement.components.actor.devices=1",
        ],
    ),
    "hybrid": (
        "rollout 0-1, reward 0, actor 1",
        [
            "placement.mode=hybrid",
            "placement.components.rollout.devices=0-1",
            "placement.components.reward.devices=0",
            "placement.components.actor.devices=1",
        ],
    ),
}


def run_once(cluster: Cluster, mode: str, steps: int, run_dir: Path) -> dict[str, Any]:
    """One GRPO run in ``mode``; returns its step times and its stage summary after the first step."""
    overrides = [f"run.steps={steps}", "run.eval_prompts=0", "run.save_every=0", *MODES[mode][1]]
    cfg = load_config(grpo.GRPOConfig, EXAMPLE, overrides)
    before = list(cluster.groups)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        with (run_dir.parent / f"{run_dir.name}.log").open("w") as log, contextlib.redirect_stdout(log):
            grpo.main(cfg, run_dir, cluster=cluster, show_progress=False)
    finally:
        for group in [g for g in cluster.groups if g not in before]:
            group.kill()
            cluster.groups.remove(group)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_s = [r["time/step"] for r in records if "time/step" in r]
    tracks = read_chrome_trace(run_dir / "trace.json")
    windows = iteration_windows(tracks)
    steady = clip_tracks(tracks, windows[1].start, windows[-1].end) if len(windows) > 1 else tracks
    return {
        "step_s": step_s,
        "iteration_s": statistics.median(step_s[1:] or step_s),
        "stages": {s.stage: {"call_s": s.call_s, **s.seconds} for s in stage_summary(steady)},
        "summary": format_summary(stage_summary(steady)),
        "run_dir": str(run_dir),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode (median reported); at least 3")
    parser.add_argument("--steps", type=int, default=6, help="GRPO steps per run (the first is not timed)")
    parser.add_argument("--out", default="runs/grpo-modes", help="run directories go here")
    parser.add_argument("--json", default=None, help="also write every run's numbers here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 2:
        parser.error(f"--repeats={args.repeats} must be >= 1 and --steps={args.steps} >= 2 (step 1 is warm-up)")
    root = Path(args.out) / time.strftime("%Y%m%d-%H%M%S")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    with Cluster(num_cpu_slots=2) as cluster:
        if len(cluster.devices) != 2:
            raise SystemExit(
                f"this benchmark compares placements on 2 devices; the cluster has {len(cluster.devices)}."
            )
        print(cluster)
        for rep in range(args.repeats):
            for mode in MODES:
                start = time.perf_counter()
                run = run_once(cluster, mode, args.steps, root / f"{mode}-{rep}")
                runs[mode].append(run)
                print(
                    f"  repeat {rep + 1}/{args.repeats}  {mode:<14} {run['iteration_s']:6.3f} s/iteration  "
                    f"({time.perf_counter() - start:.0f} s in all)",
                    flush=True,
                )
    rows: dict[str, dict[str, Any]] = {}
    for mode, results in runs.items():
        times = [r["iteration_s"] for r in results]
        median = statistics.median(times)
        mid = min(range(len(results)), key=lambda i: abs(times[i] - median))
        rows[mode] = {"iteration_s": median, "runs_iteration_s": times, "median_run": results[mid]}
    base = rows["collocated"]["iteration_s"]
    print(
        f"\nGRPO, {EXAMPLE.name}, {args.steps} steps per run (iteration time: median of steps 2..{args.steps}), "
        f"medians of {args.repeats} runs\n"
    )
    head = f"{'mode':<14} {'placement':<31} {'s/iteration':>11} {'vs collocated':>13}"
    print(head + "   busy share per stage (rollout / reward / actor)")
    print("-" * (len(head) + 49))
    for mode, row in rows.items():
        stages = row["median_run"]["stages"]
        busy = " / ".join(
            f"{100 * stages[s]['busy'] / stages[s]['call_s']:3.0f}%" if stages.get(s, {}).get("call_s") else "  -"
            for s in ("rollout", "reward", "actor")
        )
        print(f"{mode:<14} {MODES[mode][0]:<31} {row['iteration_s']:11.3f} {base / row['iteration_s']:12.2f}x   {busy}")
    best = min(rows, key=lambda m: rows[m]["iteration_s"])
    print(f"\nfastest: {best}, {base / rows[best]['iteration_s']:.2f}x the collocated iteration rate")
    for mode, row in rows.items():
        print(f"\n{mode}: where each stage's time went over steps 2..{args.steps} (median run)")
        print(indent(row["median_run"]["summary"], "  "))
    out = {
        "config": vars(args),
        "categories": list(CATEGORIES),
        "modes": {
            m: {**r, "median_run": {k: v for k, v in r["median_run"].items() if k != "summary"}}
            for m, r in rows.items()
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
