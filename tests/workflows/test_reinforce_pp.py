"""REINFORCE++ workflow: shaped, batch-whitened token advantages by hand, and a CLI run of the tiny example."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rlinf import cli
from rlinf.config import load_config
from rlinf.models import build_tiny_model
from rlinf.workers.inference import pack_groups
from rlinf.workers.rollout import Group
from rlinf.workflows.reinforce_pp import ReinforcePPConfig, reinforce_pp_advantages

from ._tiny_run import metric_records, run_tiny, track_names

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "reinforce_pp_math_tiny.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-nano", size="nano", seed=0)


def two_samples(old: list[float], ref: list[float] | None) -> Group:
    """One prompt, two samples: a 2-token answer with reward 1 and a 1-token answer with reward 0."""
    return Group(
        prompt_ids=torch.tensor([1, 2]),
        response_ids=torch.tensor([[5, 6], [7, 0]]),
        response_mask=torch.tensor([[True, True], [True, False]]),
        logprobs=torch.tensor([old[:2], [old[2], 0.0]]),
        texts=("", ""),
        truncated=(False, False),
        failures=("", ""),
        problem=None,
        version=0,
        rewards=torch.tensor([1.0, 0.0]),
        ref_logprobs=None if ref is None else torch.tensor([ref[:2], [ref[2], 0.0]]),
    )


def test_advantages_without_kl_are_whitened_returns_by_hand():
    # Returns-to-go [1, 1] and [0]: mean 2/3, population std sqrt(2)/3, so +1/sqrt(2) and -sqrt(2).
    g = two_samples([-1.0, -1.0, -1.0], None)
    adv, kl = reinforce_pp_advantages([g], pack_groups([g], pad_id=0), kl_coef=0.0)
    r = 1 / math.sqrt(2)
    assert adv.tolist() == [pytest.approx([r, r], abs=1e-5), pytest.approx([-2 * r, 0.0], abs=1e-5)]
    assert float(kl.abs().sum()) == 0.0


def test_kl_penalty_shapes_the_token_rewards_by_hand():
    # k1 = old - ref = 1 on the first token only; kl_coef 0.5 makes the rewards [-0.5, 1] and [0],
    # returns [0.5, 1] and [0]: mean 0.5, std sqrt(1/6), so [0, sqrt(1.5)] and [-sqrt(1.5)].
    g = two_samples([-1.0, -2.0, -3.0], [-2.0, -2.0, -3.0])
    adv, kl = reinforce_pp_advantages([g], pack_groups([g], pad_id=0), kl_coef=0.5)
    s = math.sqrt(1.5)
    assert adv.tolist() == [pytest.approx([0.0, s], abs=1e-5), pytest.approx([-s, 0.0], abs=1e-5)]
    assert kl.tolist() == [pytest.approx([1.0, 0.0]), pytest.approx([0.0, 0.0])]
    with pytest.raises(ValueError, match="reference log-probs"):
        g0 = two_samples([-1.0, -1.0, -1.0], None)
        reinforce_pp_advantages([g0], pack_groups([g0], pad_id=0), kl_coef=0.5)


def test_example_config_loads_and_allows_one_sample_per_prompt():
    cfg = load_config(ReinforcePPConfig, EXAMPLE, cli._with_run_prefix(ReinforcePPConfig, ["steps=2"]))
    assert cfg.run.steps == 2 and cfg.run.name == "reinforce-pp-math-tiny"
    assert cfg.components == ("rollout", "reward", "actor")
    assert load_config(ReinforcePPConfig, EXAMPLE, ["rollout.group_size=1"]).rollout.group_size == 1


def test_cli_runs_reinforce_pp_and_writes_the_run_directory(cluster, model_dir, tmp_path):
    run_dir = tmp_path / "run"
    code = run_tiny("reinforce_pp", EXAMPLE, model_dir, run_dir)
    assert code == 0
    resolved = load_config(ReinforcePPConfig, run_dir / "config.yaml")
    assert resolved.run.steps == 2 and resolved.model.path == str(model_dir)
    records, steps = metric_records(run_dir)
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["actor/groups"] == 8 and r["reward/samples"] == 32 and r["actor/version"] == r["step"]
        assert r["actor/ref_kl"] == 0.0  # the penalty is off in the example
    assert "eval/accuracy" in records[-1]
    names = track_names(run_dir)
    assert any("actor" in n for n in names) and any("rollout" in n for n in names)
    assert (run_dir / "checkpoints" / "final" / "actor.pt").is_file()


@pytest.mark.slow
def test_kl_penalty_routes_groups_through_inference(cluster, model_dir, tmp_path):
    from rlinf.workflows.reinforce_pp import main

    cfg = load_config(
        ReinforcePPConfig,
        EXAMPLE,
        [
            f"model.path={model_dir}",
            "run.steps=2",
            "run.eval_prompts=2",
            "actor.kl_coef=0.05",
            "placement.components.inference.devices=1",
        ],
    )
    out = main(cfg, tmp_path / "run", show_progress=False)
    assert out["inference/groups"] == 8 and out["actor/groups"] == 8
    assert math.isfinite(out["actor/ref_kl"]) and math.isfinite(out["actor/loss"])


def test_default_run_name_is_the_workflow():
    assert ReinforcePPConfig().run.name == "reinforce_pp"
