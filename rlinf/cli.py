"""The ``rlinf`` command: ``rlinf run <workflow> [config.yaml] [key=value ...]``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlinf.config import load_config
from rlinf.errors import ConfigError, PlacementError


def resolve_workflow(name: str) -> Any:
    """Imports ``rlinf.workflows.<name>``; it must define a config dataclass and ``main(cfg, run_dir)``."""
    try:
        module = importlib.import_module(f"rlinf.workflows.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"rlinf.workflows.{name}":
            raise
        import rlinf.workflows as pkg

        known = sorted(p.stem for p in Path(pkg.__file__ or ".").parent.glob("*.py") if not p.stem.startswith("_"))
        raise SystemExit(f"rlinf: no workflow {name!r}; known workflows: {', '.join(known) or 'none'}.") from None
    return module


def config_class(module: Any) -> type:
    """The workflow's config dataclass: the type of ``main``'s ``cfg`` parameter."""
    import typing

    hints = typing.get_type_hints(module.main)
    cls = hints.get("cfg")
    if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
        raise SystemExit(f"rlinf: {module.__name__}.main has no dataclass-typed 'cfg' parameter.")
    return cls


def run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlinf run", description="Run a workflow.")
    parser.add_argument("workflow", help="workflow name, e.g. grpo (the module rlinf.workflows.<name>)")
    parser.add_argument("args", nargs="*", help="an optional config.yaml, then key=value overrides")
    parser.add_argument("--run-dir", default=None, help="write here instead of runs/<name>-<timestamp>/")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    ns = parser.parse_intermixed_args(argv)
    yaml_path = None
    overrides = list(ns.args)
    if overrides and "=" not in overrides[0]:
        yaml_path = overrides.pop(0)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        parser.error(f"{bad[0]!r} is not key=value; the config file goes first, e.g. rlinf run grpo cfg.yaml steps=2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    module = resolve_workflow(ns.workflow)
    cls = config_class(module)
    try:
        cfg: Any = load_config(cls, yaml_path, _with_run_prefix(cls, overrides))
    except ConfigError as e:
        print(f"rlinf: config error: {e}", file=sys.stderr)
        return 2
    run_cfg = getattr(cfg, "run", None)
    if ns.run_dir:
        run_dir = Path(ns.run_dir)
    else:
        root = Path(getattr(run_cfg, "output_dir", "runs"))
        name = getattr(run_cfg, "name", ns.workflow)
        run_dir = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"run directory: {run_dir}", flush=True)
    try:
        summary = module.main(cfg, run_dir, show_progress=not ns.no_progress)
    except (ConfigError, PlacementError) as e:
        print(f"rlinf: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    if isinstance(summary, dict):
        for key in ("eval/loss_before", "eval/loss_after", "eval/accuracy_before", "eval/accuracy_after"):
            if key in summary:
                print(f"{key}: {summary[key]:.3f}")
    return 0


def _with_run_prefix(cls: type, overrides: list[str]) -> list[str]:
    """Lets ``steps=2`` stand for ``run.steps=2`` when the key is only in the ``run`` section."""
    import typing

    top = {f.name for f in dataclasses.fields(cls)}
    run_tp = typing.get_type_hints(cls).get("run")
    run_keys = {f.name for f in dataclasses.fields(run_tp)} if dataclasses.is_dataclass(run_tp) else set()
    out = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        out.append(f"run.{item}" if "." not in key and key not in top and key in run_keys else item)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: rlinf run <workflow> [config.yaml] [key=value ...]\n\nworkflows: rlinf.workflows.<name>")
        return 0
    if args[0] != "run":
        print(f"rlinf: unknown command {args[0]!r}; try: rlinf run grpo examples/grpo_math_tiny.yaml", file=sys.stderr)
        return 2
    return run(args[1:])


if __name__ == "__main__":
    sys.exit(main())
