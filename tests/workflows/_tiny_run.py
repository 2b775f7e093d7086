"""Runs a workflow through the CLI on the tiny model and reads back its run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rlinf import cli


def run_tiny(workflow: str, example: Path, model_dir: Path, run_dir: Path) -> int:
    """``rlinf run <workflow> <example> steps=2`` on ``model_dir``, small eval and completions."""
    args = [f"model.path={model_dir}", "run.eval_prompts=4", "rollout.max_new_tokens=8"]
    return cli.main(["run", workflow, str(example), "steps=2", *args, "--run-dir", str(run_dir), "--no-progress"])


def metric_records(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All lines of metrics.jsonl, and those of the training steps."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, [r for r in records if "reward/mean" in r]


def track_names(run_dir: Path) -> set[str]:
    """Names of the tracks (one per rank) in the run's trace."""
    trace = json.loads((run_dir / "trace.json").read_text())
    return {e.get("args", {}).get("name", "") for e in trace["traceEvents"] if e.get("ph") == "M"}


def calls(run_dir: Path, track: str, method: str) -> list[tuple[float, float]]:
    """(start, end) of each ``method`` call on one rank's track of the run's trace, in time order."""
    trace = json.loads((run_dir / "trace.json").read_text())["traceEvents"]
    pids = {e["pid"] for e in trace if e.get("ph") == "M" and e.get("args", {}).get("name") == track}
    spans = [e for e in trace if e.get("ph") == "X" and e["pid"] in pids and e["name"] == method]
    return sorted((e["ts"], e["ts"] + e["dur"]) for e in spans)
