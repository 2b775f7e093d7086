"""Embodied PPO and GRPO workflows: every example runs at tiny size through the CLI and writes a complete run
directory, in hybrid and collocated placement (disaggregated where the machine has three devices); bad configs
are refused with a hint; CartPole learns to a mean return of 475 (slow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rlinf import cli
from rlinf.config import load_config
from rlinf.workflows.embodied_grpo import EmbodiedGRPOConfig
from rlinf.workflows.embodied_ppo import EmbodiedPPOConfig

from ._tiny_run import calls, track_names

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# example -> (workflow, overrides that shrink it to a smoke run)
SMOKE: dict[str, tuple[str, list[str]]] = {
    "embodied_ppo_cartpole.yaml": ("embodied_ppo", ["steps=2", "env.num_envs=4", "rollout.horizon=8"]),
    "embodied_grpo_cartpole.yaml": (  # its smoke run is the collocated test below
        "embodied_grpo",
        ["steps=2", "env.num_envs=8", "env.group_size=2", "rollout.horizon=30", "actor.minibatches=2"],
    ),
    "embodied_ppo_pushcube.yaml": (
        "embodied_ppo",
        ["steps=1", "env.num_envs=2", "rollout.horizon=4", "actor.minibatches=2", "policy.hidden_sizes=[32]"],
    ),
    "embodied_vla_pushcube_rgb.yaml": (
        "embodied_ppo",
        ["steps=1", "env.num_envs=2", "rollout.horizon=2", "actor.minibatches=2", "policy.num_layers=1"],
    ),
}


def run_cli(workflow: str, example: str, run_dir: Path, extra: list[str] = ()) -> int:  # type: ignore[assignment]
    args = [*SMOKE[example][1], *extra, "--run-dir", str(run_dir), "--no-progress"]
    return cli.main(["run", workflow, str(EXAMPLES / example), *args])


def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_run_dir(run_dir: Path, cfg_cls: type, steps: int) -> list[dict[str, Any]]:
    assert (run_dir / "config.yaml").is_file()
    cfg = load_config(cfg_cls, run_dir / "config.yaml")
    assert cfg.run.steps == steps
    recs = records(run_dir)
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    for r in recs:  # on-policy, rollout k acts with version k-1; running one ahead, with k-2
        assert r["actor/version"] == r["step"]
        assert r["rollout/version"] == max(r["step"] - 1 - cfg.run.rollout_ahead, 0)
        assert r["env/steps"] > 0 and r["actor/samples"] > 0 and r["time/step"] > 0
    names = track_names(run_dir)
    assert set(cfg.components) <= {n.split(" ")[0].split("-")[0] for n in names}
    assert ("rollout" in cfg.components) == any(n.startswith("rollout") for n in names)
    assert (run_dir / "checkpoints" / "final" / "actor.pt").is_file()
    return recs


@pytest.mark.parametrize("example", sorted(set(SMOKE) - {"embodied_grpo_cartpole.yaml"}))
def test_every_example_runs_at_tiny_size(fresh_groups, tmp_path, example):
    if "pushcube" in example:
        from rlinf.envs.maniskill_env import vulkan_problem

        problem = vulkan_problem()
        if problem is not None:
            pytest.skip(problem)
    workflow, overrides = SMOKE[example]
    assert run_cli(workflow, example, tmp_path / "run") == 0
    cfg_cls = EmbodiedGRPOConfig if workflow == "embodied_grpo" else EmbodiedPPOConfig
    steps = int(next(o for o in overrides if o.startswith("steps=")).split("=")[1])
    recs = check_run_dir(tmp_path / "run", cfg_cls, steps)
    if workflow == "embodied_ppo":  # every step of every env is trained on
        assert all(r["actor/samples"] == r["env/steps"] for r in recs)


def test_collocated_placement_runs_two_ranks_of_everything(fresh_groups, tmp_path):
    """GRPO with every component on both slots: two env ranks, two rollout ranks, two DDP actor ranks."""
    every = [f"placement.components.{c}.devices=all" for c in ("env", "rollout", "actor")]
    example = "embodied_grpo_cartpole.yaml"
    assert run_cli("embodied_grpo", example, tmp_path / "run", ["placement.mode=collocated", *every]) == 0
    recs = check_run_dir(tmp_path / "run", EmbodiedGRPOConfig, 2)
    assert all(0 < r["actor/samples"] <= r["env/steps"] for r in recs)  # first episodes only
    names = track_names(tmp_path / "run")
    assert {"env rank 1", "rollout rank 1", "actor rank 1"} <= names


def test_ppo_with_a_policy_rollout_worker_beside_the_envs(fresh_groups, tmp_path):
    """The CartPole example acts in the env ranks (rollout.inline); the same run with the policy in a
    rollout worker of its own on the env's slot ping-pongs through channels and trains on the same steps."""
    extra = ["rollout.inline=false", "placement.components.rollout.devices=0"]
    assert run_cli("embodied_ppo", "embodied_ppo_cartpole.yaml", tmp_path / "run", extra) == 0
    recs = check_run_dir(tmp_path / "run", EmbodiedPPOConfig, 2)
    assert all(r["actor/samples"] == r["env/steps"] == r["rollout/samples"] - 4 for r in recs)


def test_grpo_acting_in_the_env_ranks(fresh_groups, tmp_path):
    """GRPO with rollout.inline switched on from the command line (the example places a rollout worker)."""
    extra = ["rollout.inline=true", "rollout.stages=1", "placement.components.rollout=null"]
    assert run_cli("embodied_grpo", "embodied_grpo_cartpole.yaml", tmp_path / "run", extra) == 0
    recs = check_run_dir(tmp_path / "run", EmbodiedGRPOConfig, 2)
    assert all(0 < r["actor/samples"] <= r["env/steps"] for r in recs)  # first episodes only
    assert all(r["rollout/samples"] >= r["env/steps"] for r in recs)


def test_disaggregated_placement(fresh_groups, tmp_path):
    if len(fresh_groups.devices) < 3:
        pytest.skip(
            f"disaggregated placement needs 3 devices (env, rollout, actor); this machine has "
            f"{len(fresh_groups.devices)}"
        )
    placement = [f"placement.components.{c}.devices={i}" for i, c in enumerate(("env", "rollout", "actor"))]
    extra = ["placement.mode=disaggregated", "rollout.inline=false", *placement]
    code = run_cli("embodied_ppo", "embodied_ppo_cartpole.yaml", tmp_path / "run", extra)
    assert code == 0
    check_run_dir(tmp_path / "run", EmbodiedPPOConfig, 2)


def test_bad_configs_are_refused_with_a_hint(cluster, capsys):
    example = str(EXAMPLES / "embodied_ppo_cartpole.yaml")
    assert cli.main(["run", "embodied_ppo", example, "rollout.stagse=2"]) == 2
    assert "did you mean 'rollout.stages'" in capsys.readouterr().err.lower()
    uneven = ["env.num_envs=6", "rollout.stages=4", "rollout.inline=false", "placement.components.rollout.devices=0"]
    assert cli.main(["run", "embodied_ppo", example, *uneven]) == 2
    assert "try env.num_envs=4" in capsys.readouterr().err.lower()
    grpo = str(EXAMPLES / "embodied_grpo_cartpole.yaml")
    assert cli.main(["run", "embodied_grpo", grpo, "env.group_size=1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert cli.main(["run", "embodied_ppo", example, "run.rollout_ahead=2"]) == 2
    assert "use 0 (on-policy) or 1" in capsys.readouterr().err
    # the example acts in the env ranks (rollout.inline): no stages to overlap, no rollout to place
    assert cli.main(["run", "embodied_ppo", example, "rollout.stages=2"]) == 2
    assert "set rollout.stages=1" in capsys.readouterr().err
    assert cli.main(["run", "embodied_ppo", example, "placement.components.rollout.devices=1"]) == 2
    assert "remove placement.components.rollout" in capsys.readouterr().err


def test_ppo_one_rollout_ahead_collects_the_next_rollout_while_this_one_trains(fresh_groups, tmp_path):
    """run.rollout_ahead=1: rollout k+1 starts when rollout k ends, by the weights of update k-1."""
    example = "embodied_ppo_cartpole.yaml"
    extra = ["steps=4", "run.rollout_ahead=1"]
    assert run_cli("embodied_ppo", example, tmp_path / "run", extra) == 0
    recs = records(tmp_path / "run")
    assert [r["actor/version"] for r in recs] == [1, 2, 3, 4]
    assert [r["rollout/version"] for r in recs] == [0, 0, 1, 2]  # update k-1 is published after rollout k+1 starts
    assert [r["actor/staleness"] for r in recs] == [0, 1, 1, 1]
    assert all(r["actor/samples"] == r["env/steps"] for r in recs)
    acting = calls(tmp_path / "run", "env rank 0", "EnvWorker.interact")
    training = calls(tmp_path / "run", "actor rank 0", "EmbodiedActorWorker.train")
    assert len(acting) == len(training) == 4
    for k in range(3):  # rollout k+1 begins before training on rollout k ends
        assert acting[k + 1][0] < training[k][1]


@pytest.mark.slow
def test_ppo_learns_cartpole_to_475(fresh_groups, tmp_path):
    from rlinf.workflows.embodied_ppo import main

    cfg = load_config(EmbodiedPPOConfig, EXAMPLES / "embodied_ppo_cartpole.yaml")
    out = main(cfg, tmp_path / "run", cluster=fresh_groups, show_progress=False)
    returns = [r["env/return_window"] for r in records(tmp_path / "run") if "env/return_window" in r]
    assert out["run/reached_target"] == 1.0 and returns[-1] >= 475, returns
    assert returns[0] < 100  # it started from a random policy


@pytest.mark.slow
def test_grpo_raises_cartpole_returns(fresh_groups, tmp_path):
    from rlinf.workflows.embodied_grpo import main

    cfg = load_config(EmbodiedGRPOConfig, EXAMPLES / "embodied_grpo_cartpole.yaml", ["run.steps=15"])
    main(cfg, tmp_path / "run", cluster=fresh_groups, show_progress=False)
    returns = [r["env/return_mean"] for r in records(tmp_path / "run")]
    assert sum(returns[-3:]) / 3 > 2 * sum(returns[:3]) / 3, returns
