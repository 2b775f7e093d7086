"""PPO workflow: the CLI runs the tiny example in each placement mode and writes a complete run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlinf import cli
from rlinf.config import load_config
from rlinf.models import build_tiny_model
from rlinf.workflows.ppo import PPOConfig

from ._tiny_run import metric_records, run_tiny, track_names

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ppo_math_tiny.yaml"
COMPONENTS = ("rollout", "reward", "critic", "actor")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-nano", size="nano", seed=0)


def test_example_config_loads_with_a_critic_section():
    cfg = load_config(PPOConfig, EXAMPLE, cli._with_run_prefix(PPOConfig, ["steps=2", "critic.lam=1.0"]))
    assert cfg.run.steps == 2 and cfg.run.name == "ppo-math-tiny" and cfg.critic.lam == 1.0
    assert cfg.components == COMPONENTS
    assert set(cfg.placement.components) == set(COMPONENTS) and cfg.placement.mode == "hybrid"
    assert load_config(PPOConfig, EXAMPLE, ["rollout.group_size=1"]).rollout.group_size == 1
    assert PPOConfig().run.name == "ppo"


def test_cli_rejects_bad_critic_config_with_a_hint(capsys):
    assert cli.main(["run", "ppo", str(EXAMPLE), "critic.lamda=0.9"]) == 2
    assert "did you mean 'critic.lam'" in capsys.readouterr().err.lower()
    assert cli.main(["run", "ppo", str(EXAMPLE), "critic.epochs=0"]) == 2
    assert "critic.epochs=0" in capsys.readouterr().err


def check_run_dir(run_dir: Path, model_dir: Path) -> None:
    """Two steps of 8 groups went through every stage; config, metrics, trace and checkpoints exist."""
    resolved = load_config(PPOConfig, run_dir / "config.yaml")
    assert resolved.run.steps == 2 and resolved.model.path == str(model_dir)
    records, steps = metric_records(run_dir)
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["rollout/groups"] == 8 and r["reward/samples"] == 32
        assert r["critic/groups"] == 8 and r["actor/groups"] == 8
        assert r["actor/version"] == r["step"] and r["critic/version"] == r["step"]
        assert r["actor/micro_batches"] == 1  # per rank: advantages are whitened over the rank's whole share
        assert math.isfinite(r["critic/value_loss"]) and math.isfinite(r["actor/loss"])
    assert "eval/accuracy" in records[-1]
    names = track_names(run_dir)
    assert all(any(c in n for n in names) for c in COMPONENTS), names
    final = run_dir / "checkpoints" / "final"
    assert (final / "actor.pt").is_file() and (final / "critic.pt").is_file()
    assert (final / "model" / "config.json").is_file()
    assert (run_dir / "summary.txt").is_file()


def test_cli_runs_ppo_hybrid_and_writes_the_run_directory(cluster, fresh_groups, model_dir, tmp_path):
    assert run_tiny("ppo", EXAMPLE, model_dir, tmp_path / "run") == 0
    check_run_dir(tmp_path / "run", model_dir)


def run_placed(model_dir: Path, run_dir: Path, mode: str, devices: dict[str, str]) -> int:
    place = [f"placement.mode={mode}", *(f"placement.components.{c}.devices={d}" for c, d in devices.items())]
    args = [f"model.path={model_dir}", "run.eval_prompts=4", "rollout.max_new_tokens=8", *place]
    return cli.main(["run", "ppo", str(EXAMPLE), "steps=2", *args, "--run-dir", str(run_dir), "--no-progress"])


@pytest.mark.slow  # eight worker processes on two cores: about twice the hybrid run
def test_cli_runs_ppo_collocated_with_two_ranks_per_component(cluster, fresh_groups, model_dir, tmp_path):
    """Every component on both slots: two DDP ranks each for critic and actor, taking turns on each slot.

    With two ranks per group sharing devices, a rank that waited in an all-reduce while holding a
    device could block its peers for good; the critic reduces its gradients outside the device lock.
    """
    assert run_placed(model_dir, tmp_path / "run", "collocated", dict.fromkeys(COMPONENTS, "all")) == 0
    check_run_dir(tmp_path / "run", model_dir)


def test_cli_runs_ppo_disaggregated(cluster, fresh_groups, model_dir, tmp_path):
    if len(cluster.devices) < len(COMPONENTS):
        pytest.skip(
            f"disaggregated PPO puts its {len(COMPONENTS)} components on disjoint devices; this cluster has "
            f"{len(cluster.devices)}"
        )
    devices = {c: str(i) for i, c in enumerate(COMPONENTS)}
    assert run_placed(model_dir, tmp_path / "run", "disaggregated", devices) == 0
    check_run_dir(tmp_path / "run", model_dir)


def test_disaggregated_placement_on_too_few_devices_is_a_clear_error(capsys, model_dir, tmp_path, cluster):
    if len(cluster.devices) >= len(COMPONENTS):
        pytest.skip("this cluster has room for a disaggregated PPO run")
    devices = {"rollout": "0", "reward": "1", "critic": "0", "actor": "1"}
    assert run_placed(model_dir, tmp_path / "run", "disaggregated", devices) == 2
    assert "disjoint devices" in capsys.readouterr().err


def digit_share(text: str, problem: object, truncated: bool) -> tuple[float, bool, str]:
    """Reward = share of response characters that are digits: dense enough for a random tiny model."""
    share = sum(c.isdigit() for c in text) / max(len(text), 1)
    return share, share > 0.5, "digits"


@pytest.mark.slow
def test_ppo_reward_rises_and_the_critic_learns_on_an_easy_task(cluster, fresh_groups, model_dir, tmp_path):
    """With a dense easy reward (write digits), reward rises within 30 steps and the critic keeps up with it."""
    from rlinf.workflows.ppo import main

    cfg = load_config(
        PPOConfig,
        EXAMPLE,
        [
            f"model.path={model_dir}",
            "run.steps=30",
            "run.eval_prompts=0",
            "actor.lr=3e-3",
            "critic.lr=3e-3",
            "rollout.max_new_tokens=6",
            "rollout.group_size=8",
        ],
    )
    main(cfg, tmp_path / "run", cluster=cluster, show_progress=False, verifier=digit_share)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward/mean" in r]
    rewards = [r["reward/mean"] for r in steps]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1, rewards
    # The critic follows the rising return: its mean value climbs with it and ends close to it.
    values, returns = [r["critic/values"] for r in steps], [r["critic/returns"] for r in steps]
    assert sum(values[-5:]) / 5 > sum(values[:5]) / 5 + 0.1, values
    assert sum(abs(v - r) for v, r in zip(values[-5:], returns[-5:], strict=True)) / 5 < 0.1, (values, returns)


@pytest.mark.slow
def test_ppo_with_kl_penalty_routes_groups_through_inference(cluster, fresh_groups, model_dir, tmp_path):
    from rlinf.workflows.ppo import main

    cfg = load_config(
        PPOConfig,
        EXAMPLE,
        [
            f"model.path={model_dir}",
            "run.steps=2",
            "run.eval_prompts=2",
            "actor.kl_coef=0.05",
            "placement.components.inference.devices=1",
        ],
    )
    out = main(cfg, tmp_path / "run", cluster=cluster, show_progress=False, verifier=digit_share)
    assert out["inference/groups"] == 8 and out["critic/groups"] == 8 and out["actor/groups"] == 8
    assert math.isfinite(out["actor/ref_kl"]) and math.isfinite(out["critic/value_loss"])


def test_ppo_and_sft_refuse_to_run_the_rollout_ahead_and_say_why():
    from rlinf.errors import ConfigError
    from rlinf.workflows.sft import SFTConfig

    with pytest.raises(ConfigError, match=r"run.rollout_ahead=1: PPO's critic .* set run.rollout_ahead=0"):
        load_config(PPOConfig, EXAMPLE, ["run.rollout_ahead=1"])
    sft_example = EXAMPLE.with_name("sft_math_tiny.yaml")
    with pytest.raises(ConfigError, match=r"SFT trains on gold answers .* set run.rollout_ahead=0"):
        load_config(SFTConfig, sft_example, ["run.rollout_ahead=1"])
    with pytest.raises(ConfigError, match=r"run.rollout_ahead=-1 must be >= 0"):
        load_config(PPOConfig, EXAMPLE, ["run.rollout_ahead=-1"])
