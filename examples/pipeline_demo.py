"""A two-stage pipeline over channels, run in two placements, with per-stage throughput.

    python examples/pipeline_demo.py [batches=40] [work=6] [run_dir=runs/pipeline-demo]

Stage ``generate`` makes batches (CPU-bound matrix work standing in for a rollout) and streams
them through a channel to stage ``train`` (more matrix work standing in for an optimizer step).
The same code runs twice:

    disaggregated  generate on CPU slot 0, train on slot 1: the stages overlap
    collocated     both on slot 0: they take turns through the device lock (offload/onload)

It prints the placements, each stage's items/s and busy share, and writes a Chrome trace per
run (open it in https://ui.perfetto.dev) into the run directory. ``benchmarks/two_stage_pipeline.py``
imports ``Stage`` and ``run_pipeline`` from here and measures the same pipeline side by side.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from textwrap import indent

import torch

from rlinf import Channel, Cluster, Placement, Worker
from rlinf.config import load_config
from rlinf.timeline import format_summary, plot_gantt, stage_summary
from rlinf.trace import Track


@dataclass(frozen=True)
class DemoConfig:
    batches: int = 40
    batch_size: int = 64
    work: int = 6  # matrix products per batch and stage
    dim: int = 384
    threads: int = 0  # torch threads per rank; 0 = one per core of its devices
    spin_ms: float = 0.0  # > 0: each batch and stage spins in pure Python this long instead of the matrix work
    run_dir: str = "runs/pipeline-demo"

    def __post_init__(self) -> None:
        for name in ("batches", "batch_size", "work", "dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.threads < 0:
            raise ValueError(f"threads={self.threads} must be >= 0 (0 = one per core of the rank's devices)")
        if self.spin_ms < 0:
            raise ValueError(f"spin_ms={self.spin_ms} must be >= 0 (0 = matrix work)")


class Stage(Worker):
    """Both stages: ``generate`` produces into a channel, ``train`` consumes from one."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(self.rank)
        self.weight = torch.randn(cfg.dim, cfg.dim) / cfg.dim**0.5
        self.offloaded_bytes = 0

    def offload(self) -> None:
        # A real component would move weights/optimizer state to host memory or free a KV cache.
        self.offloaded_bytes = self.weight.numel() * self.weight.element_size()

    def onload(self) -> None:
        self.offloaded_bytes = 0

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.spin_ms:  # a known cost: one thread busy for a fixed time
            deadline = time.perf_counter() + self.cfg.spin_ms / 1e3
            while time.perf_counter() < deadline:
                pass
            return x
        for _ in range(self.cfg.work):
            x = torch.tanh(x @ self.weight)
        return x

    def generate(self, out: Channel) -> dict[str, float]:
        busy, start = 0.0, time.time()
        mine = range(self.rank, self.cfg.batches, self.world_size)  # this rank's share of the batches
        for i in mine:
            with self.device_lock():
                t = time.time()
                x = self._compute(torch.randn(self.cfg.batch_size * 16, self.cfg.dim))
                busy += time.time() - t
            out.put(x, version=i)
        return {"items": len(mine), "busy_s": busy, "wall_s": time.time() - start}

    def train(self, inp: Channel) -> dict[str, float]:
        busy, start, n = 0.0, time.time(), 0
        for x in inp:
            with self.device_lock():
                t = time.time()
                self._compute(x).mean().item()
                busy += time.time() - t
            n += 1
        return {"items": n, "busy_s": busy, "wall_s": time.time() - start}


@dataclass(frozen=True)
class PipelineRun:
    """What one run of the pipeline measured.

    Args:
        wall_s: from launching both stages' calls to the end of the last ``train`` call.
        stages: per stage, per rank: ``items``, ``busy_s`` (inside the device lock) and ``wall_s``.
        switches: seconds of every shared-device lock acquisition (wait + switch), all ranks.
        tracks: the trace of the run (the driver's and every rank's spans).
    """

    wall_s: float
    stages: dict[str, list[dict[str, float]]]
    switches: list[float]
    tracks: list[Track]


def run_pipeline(cluster: Cluster, cfg: DemoConfig, placement: Placement, tag: str) -> PipelineRun:
    """Launches both stages on ``placement``, streams ``cfg.batches`` batches through, stops the stages."""
    gen = Stage.launch(cluster, placement, cfg, name="generate")
    train = Stage.launch(cluster, placement, cfg, name="train")
    try:
        ch = Channel(f"batches-{tag}", maxsize=4)
        start = time.time()
        h_train = train.call(Stage.train, ch)
        h_gen = gen.call(Stage.generate, ch)
        while not h_gen.done():
            if h_train.done():  # a consumer that stops early would leave generate blocked on a full channel
                h_train.wait()  # raises its error, if it had one
                raise RuntimeError(f"train returned before generate finished; channel {ch.name!r} stopped early")
            time.sleep(0.01)
        g = h_gen.wait()
        ch.close()
        t = h_train.wait()
        wall = time.time() - start
        switches = [x for per_rank in gen.switch_times() + train.switch_times() for x in per_rank]
        return PipelineRun(wall, {"generate": g, "train": t}, switches, cluster.collect_tracks())
    finally:
        for group in (gen, train):
            group.kill()
            cluster.groups.remove(group)


def run(cluster: Cluster, cfg: DemoConfig, placement: Placement, tag: str) -> float:
    print(placement)
    result = run_pipeline(cluster, cfg, placement, tag)
    wall = result.wall_s
    for name, ranks in result.stages.items():
        s = ranks[0]
        print(
            f"  {name:<9} {s['items']:>4.0f} items  {s['items'] / s['wall_s']:6.1f} items/s  "
            f"busy {100 * s['busy_s'] / s['wall_s']:5.1f}%"
        )
    switches = result.switches
    print(f"  pipeline  {cfg.batches / wall:6.1f} batches/s end to end, {wall:.1f} s")
    if switches:  # only components that share devices go through the cluster-wide lock
        median_ms = 1e3 * sorted(switches)[len(switches) // 2]
        print(f"  shared-device lock acquisitions: {len(switches)}, median {median_ms:.2f} ms (wait + switch)")
    tracks = result.tracks
    trace = cluster.write_trace(Path(cfg.run_dir) / f"trace-{tag}.json", tracks)
    print(indent(format_summary(stage_summary(tracks)), "  "))
    gantt = plot_gantt(tracks, Path(cfg.run_dir) / f"timeline-{tag}.png")
    print(f"  trace: {trace}  (open in https://ui.perfetto.dev)\n  timeline: {gantt}\n")
    return cfg.batches / wall


def main(argv: list[str]) -> None:
    cfg = load_config(DemoConfig, None, argv)
    with Cluster() as cluster:
        print(cluster, "\n")
        n = len(cluster.devices)
        if n < 2:
            raise SystemExit("this demo needs two devices (CPU slots or GPUs); this machine has one.")
        fast = run(cluster, cfg, Placement.disaggregated({"generate": "0", "train": "1"}, n), "disaggregated")
        slow = run(cluster, cfg, Placement.collocated(["generate", "train"], n, devices="0"), "collocated")
    print(f"disaggregated streaming is {fast / slow:.2f}x the collocated throughput on this machine")


if __name__ == "__main__":
    main(sys.argv[1:])
