"""Resume: 2 steps + resume for 2 gives the numbers of 4 steps straight; bad resume and model paths say what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlinf.config import load_config
from rlinf.errors import ConfigError
from rlinf.models import build_tiny_model
from rlinf.workers.config import ModelConfig
from rlinf.workflows._shared import find_checkpoint
from rlinf.workflows.grpo import GRPOConfig, main

from ._tiny_run import metric_records

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "grpo_math_tiny.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-nano", size="nano", seed=0)


def grpo(model_dir: Path, run_dir: Path, cluster, *overrides: str) -> None:
    # One pass per fixed number of groups: the same groups meet in the same sums in every run.
    base = [
        f"model.path={model_dir}",
        "run.train_batch=4",
        "run.eval_prompts=2",
        "rollout.max_new_tokens=6",
        "actor.micro_batch_groups=2",
        "actor.min_micro_batch_groups=2",
    ]
    main(load_config(GRPOConfig, EXAMPLE, [*base, *overrides]), run_dir, cluster=cluster, show_progress=False)


@pytest.mark.slow
def test_two_steps_and_a_resume_for_two_equal_four_steps_straight(cluster, model_dir, tmp_path):
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    grpo(model_dir, straight, cluster, "run.steps=4")
    grpo(model_dir, first, cluster, "run.steps=2")
    grpo(model_dir, resumed, cluster, "run.steps=4", f"run.resume_from={first}")

    _, want = metric_records(straight)
    _, got = metric_records(resumed)
    _, before = metric_records(first)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert got[:2] == before  # carried over verbatim (timings too): the resumed run trained steps 3-4 only
    for a, b in zip(want, got, strict=True):
        for key in ("reward/mean", "actor/loss", "actor/grad_norm", "actor/version"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key, a[key], b[key])
    final = json.loads((resumed / "checkpoints" / "final" / "progress.json").read_text())
    assert final == {"step": 4, "cursor": 16}


def test_resume_from_a_directory_without_a_checkpoint_says_what_to_pass(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        find_checkpoint(tmp_path / "nowhere")
    (tmp_path / "run" / "checkpoints" / "step-2").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"run.resume_from=.*holds no checkpoint.*run.save_every"):
        find_checkpoint(tmp_path / "run")


def test_resume_picks_the_newest_checkpoint_of_a_run(tmp_path):
    for name, step in (("step-2", 2), ("step-10", 10), ("final", 10), ("step-4", 4)):
        d = tmp_path / "checkpoints" / name
        d.mkdir(parents=True)
        (d / "progress.json").write_text(json.dumps({"step": step, "cursor": step * 8}))
    assert find_checkpoint(tmp_path).name == "final"
    assert find_checkpoint(tmp_path / "checkpoints" / "step-4").name == "step-4"


def test_model_path_that_does_not_exist_names_it_and_the_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"model.path='.*missing' does not exist.*'tiny'"):
        ModelConfig(path=str(tmp_path / "missing")).resolve()
    with pytest.raises(ConfigError, match=r"no config\.json"):
        ModelConfig(path=str(tmp_path)).resolve()


def test_model_path_accepts_a_checkpoint_directory(model_dir, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model").symlink_to(model_dir)
    assert ModelConfig(path=str(tmp_path / "ckpt")).resolve() == tmp_path / "ckpt" / "model"
