"""RLOO workflow: leave-one-out advantages by hand, and the CLI runs the tiny example end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlinf import cli
from rlinf.config import load_config
from rlinf.errors import ConfigError
from rlinf.models import build_tiny_model
from rlinf.workers.actor import group_advantages
from rlinf.workers.rollout import Group
from rlinf.workflows.rloo import RLOOConfig, rloo_advantages

from ._tiny_run import metric_records, run_tiny, track_names

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rloo_math_tiny.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-nano", size="nano", seed=0)


def scored_group(rewards: list[float], index: int = 0) -> Group:
    n = len(rewards)
    return Group(
        prompt_ids=torch.tensor([1, 2]),
        response_ids=torch.ones(n, 2, dtype=torch.long),
        response_mask=torch.ones(n, 2, dtype=torch.bool),
        logprobs=torch.zeros(n, 2),
        texts=("",) * n,
        truncated=(False,) * n,
        failures=("",) * n,
        problem=None,
        version=0,
        index=index,
        rewards=torch.tensor(rewards),
    )


def test_rloo_advantages_leave_one_out_by_hand():
    # Sample 0: 1 - mean(0, 0, 1) = 2/3; sample 1: 0 - mean(1, 0, 1) = -2/3. The second group is
    # all-equal, so every sample matches its baseline.
    adv = rloo_advantages([scored_group([1.0, 0.0, 0.0, 1.0]), scored_group([0.5, 0.5], index=1)])
    assert adv.tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 0.0])
    # GRPO's std-normalised advantages of the same group are +-1: the actor would train on other numbers.
    assert group_advantages([scored_group([1.0, 0.0, 0.0, 1.0])]).tolist() == pytest.approx([1, -1, -1, 1], abs=1e-5)


def test_rloo_advantages_name_the_missing_rewards_and_the_lonely_sample():
    unscored = scored_group([1.0, 0.0])
    unscored = Group(**{**unscored.__dict__, "rewards": None})
    with pytest.raises(ValueError, match="without rewards"):
        rloo_advantages([unscored])
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_advantages([scored_group([1.0])])


def test_example_config_loads_and_needs_two_samples_per_prompt():
    cfg = load_config(RLOOConfig, EXAMPLE, cli._with_run_prefix(RLOOConfig, ["steps=2"]))
    assert cfg.run.steps == 2 and cfg.run.name == "rloo-math-tiny"
    assert cfg.components == ("rollout", "reward", "actor")
    with pytest.raises(ConfigError, match="at least 2 samples per prompt"):
        load_config(RLOOConfig, EXAMPLE, ["rollout.group_size=1"])


def test_cli_runs_rloo_and_writes_the_run_directory(cluster, model_dir, tmp_path):
    run_dir = tmp_path / "run"
    code = run_tiny("rloo", EXAMPLE, model_dir, run_dir)
    assert code == 0
    resolved = load_config(RLOOConfig, run_dir / "config.yaml")
    assert resolved.run.steps == 2 and resolved.model.path == str(model_dir)
    records, steps = metric_records(run_dir)
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["actor/groups"] == 8 and r["reward/samples"] == 32 and r["actor/version"] == r["step"]
    assert "eval/accuracy" in records[-1]
    names = track_names(run_dir)
    assert any("actor" in n for n in names) and any("rollout" in n for n in names)
    assert (run_dir / "checkpoints" / "final" / "actor.pt").is_file()


def test_default_run_name_is_the_workflow():
    assert RLOOConfig().run.name == "rloo"
