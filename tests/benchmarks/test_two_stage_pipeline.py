"""The two-stage pipeline benchmark at tiny size: every mode runs, and streaming overlaps the stages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "two_stage_pipeline.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("two_stage_pipeline", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_spin_stages_overlap_when_disaggregated(cluster, tmp_path):
    out = _load().main(["--repeats", "1", "--batches", "12", "--spin-ms", "25", "--json", str(tmp_path / "r.json")])
    assert set(out["modes"]) == {"disaggregated", "collocated", "collocated-dp"}
    for row in out["modes"].values():
        assert row["batches_per_s"] > 0 and len(row["runs_batches_per_s"]) == 1
        assert row["generate_ms_per_batch"] >= 25 and row["train_ms_per_batch"] >= 25  # the busy loop's floor
    # taking turns costs both stages' time per batch; streaming on two slots about the slower one's
    assert out["ratio_disaggregated_vs_collocated"] > 1.3
    assert (tmp_path / "r.json").is_file()
