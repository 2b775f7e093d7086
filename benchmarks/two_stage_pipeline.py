"""Two-stage pipeline on two CPU slots: disaggregated streaming against collocated turn-taking, side by side.

The stages are those of ``examples/pipeline_demo.py``: ``generate`` (standing in for a rollout)
streams batches through a channel of 4 into ``train`` (standing in for an optimizer step). Each
rank works on one thread, so a batch costs the same in every mode. Per batch and stage the work is

    spin    (default) a pure-Python busy loop of ``--spin-ms`` milliseconds: a known cost that other
            load on the machine does not stretch, so the ratio measures the runtime's overlap
    matmul  ``--work`` products of a 1024x384 by a 384x384 matrix (as ``make demo-pipeline``): real CPU
            work, whose cost grows with whatever else runs on the same core

    disaggregated  generate on slot 0, train on slot 1: the stages overlap, streaming
    collocated     both stages on slots 0-1, one rank each: they take turns through the device lock,
                   so they never compute at the same time (synchronous)
    collocated-dp  both stages on slots 0-1, one rank per slot (two per stage): each slot's two ranks
                   take turns; shown for reference, it keeps both cores busy without streaming

The modes run interleaved in every repeat; each number is the median over ``--repeats`` runs.

    python benchmarks/two_stage_pipeline.py [--stage spin|matmul] [--repeats 5] [--batches 40]
                                            [--spin-ms 40] [--work 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from textwrap import indent
from typing import Any

from rlinf import Cluster, Placement
from rlinf.placement import ComponentPlacement
from rlinf.timeline import format_summary, stage_summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # workers import it from here too
from pipeline_demo import DemoConfig, PipelineRun, run_pipeline

MODES: dict[str, tuple[str, Callable[[int], Placement]]] = {
    "disaggregated": (
        "generate 0 | train 1",
        lambda n: Placement.disaggregated({"generate": "0", "train": "1"}, n),
    ),
    "collocated": (
        "both on 0-1, 1 rank each",
        lambda n: Placement(
            {c: ComponentPlacement(c, (0, 1), world_size=1) for c in ("generate", "train")}, "collocated", n
        ),
    ),
    "collocated-dp": (
        "both on 0-1, 2 ranks each",
        lambda n: Placement.collocated(["generate", "train"], n, devices="0-1"),
    ),
}


def per_batch_ms(run: PipelineRun, stage: str) -> float:
    """A stage's compute per batch, from its ranks' own timers (inside the device lock)."""
    ranks = run.stages[stage]
    items = sum(r["items"] for r in ranks)
    return 1e3 * sum(r["busy_s"] for r in ranks) / max(items, 1.0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per mode (median reported); at least 3")
    parser.add_argument("--batches", type=int, default=40, help="batches streamed per run")
    parser.add_argument("--stage", choices=("spin", "matmul"), default="spin", help="what a stage does per batch")
    parser.add_argument("--spin-ms", type=float, default=40.0, help="busy-loop milliseconds per batch (spin)")
    parser.add_argument("--work", type=int, default=6, help="matrix products per batch and stage (matmul)")
    parser.add_argument("--json", default=None, help="also write every run's numbers here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats={args.repeats} must be >= 1 (3 or more for a meaningful median)")
    spin_ms = args.spin_ms if args.stage == "spin" else 0.0
    if args.stage == "spin" and spin_ms <= 0:
        parser.error(f"--spin-ms={args.spin_ms} must be > 0; try 40")
    cfg = DemoConfig(batches=args.batches, work=args.work, threads=1, spin_ms=spin_ms, run_dir="runs/two-stage")
    runs: dict[str, list[PipelineRun]] = {m: [] for m in MODES}
    with Cluster(num_cpu_slots=2) as cluster:
        n = len(cluster.devices)
        if n < 2:
            raise SystemExit(f"this benchmark needs two devices (CPU slots or GPUs); the cluster has {n}.")
        print(cluster)
        for rep in range(args.repeats):
            for mode, (_, place) in MODES.items():
                run = run_pipeline(cluster, cfg, place(n), f"bench-{mode}-{rep}-{time.time_ns()}")
                runs[mode].append(run)
                print(f"  repeat {rep + 1}/{args.repeats}  {mode:<14} {cfg.batches / run.wall_s:6.1f} batches/s")
    rows: dict[str, dict[str, Any]] = {}
    for mode, results in runs.items():
        rates = [cfg.batches / r.wall_s for r in results]
        median = statistics.median(rates)
        rows[mode] = {
            "batches_per_s": median,
            "wall_s": statistics.median(r.wall_s for r in results),
            "generate_ms_per_batch": statistics.median(per_batch_ms(r, "generate") for r in results),
            "train_ms_per_batch": statistics.median(per_batch_ms(r, "train") for r in results),
            "runs_batches_per_s": rates,
        }
    base = rows["collocated"]["batches_per_s"]
    work = f"a {spin_ms:g} ms busy loop" if spin_ms else f"{cfg.work} products of {cfg.batch_size * 16}x{cfg.dim}"
    print(f"\n{cfg.batches} batches, {work} per batch and stage, one thread per rank; medians of {args.repeats} runs\n")
    head = f"{'mode':<14} {'placement':<26} {'batches/s':>9} {'wall s':>7} {'gen ms/batch':>12} {'train ms/batch':>14}"
    print(head + f" {'vs collocated':>13}")
    print("-" * (len(head) + 14))
    for mode, row in rows.items():
        print(
            f"{mode:<14} {MODES[mode][0]:<26} {row['batches_per_s']:9.1f} {row['wall_s']:7.2f} "
            f"{row['generate_ms_per_batch']:12.1f} {row['train_ms_per_batch']:14.1f} "
            f"{row['batches_per_s'] / base:12.2f}x"
        )
    ratio = rows["disaggregated"]["batches_per_s"] / base
    print(f"\ndisaggregated streaming is {ratio:.2f}x the collocated throughput (goal: 1.6x)")
    for mode, results in runs.items():  # where the time went, in the run closest to the median
        rates = [cfg.batches / r.wall_s for r in results]
        mid = min(range(len(results)), key=lambda i: abs(rates[i] - rows[mode]["batches_per_s"]))
        print(f"\n{mode}: where each stage's time went (median run)")
        print(indent(format_summary(stage_summary(results[mid].tracks)), "  "))
    out = {"config": vars(args), "modes": rows, "ratio_disaggregated_vs_collocated": ratio}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
