"""RewardWorker: the math verifier on hand-worked completions, failures and a verifier that raises."""

from __future__ import annotations

import pytest
import torch

from rlinf import Channel
from rlinf.envs.math_task import MathProblem, MathTaskConfig
from rlinf.workers.reward import RewardWorker, math_verifier, score_group
from rlinf.workers.rollout import Group

TASK = MathTaskConfig(operations=("add",), min_digits=1, max_digits=1, num_eval=10, format_reward=0.1)
PROBLEM = MathProblem("What is 3 + 4?", 7, "add", "add:3:4")


def make_group(texts: list[str], truncated: list[bool] | None = None, failures: list[str] | None = None) -> Group:
    n = len(texts)
    return Group(
        prompt_ids=torch.tensor([1, 2, 3]),
        response_ids=torch.ones((n, 2), dtype=torch.long),
        response_mask=torch.ones((n, 2), dtype=torch.bool),
        logprobs=torch.zeros((n, 2)),
        texts=tuple(texts),
        truncated=tuple(truncated or [False] * n),
        failures=tuple(failures or [""] * n),
        problem=PROBLEM,
        version=3,
    )


def test_math_verifier_hand_worked_cases():
    g = score_group(
        make_group(["3 + 4 = 7\nAnswer: 7", "Answer: 8", "seven", "Answer: 7"], truncated=[False, False, False, True]),
        math_verifier(TASK),
    )
    # correct -> 1.0; well-formed wrong -> format reward 0.1; no marker -> 0; a number touching a cut -> 0
    assert g.rewards is not None
    assert g.rewards.tolist() == pytest.approx([1.0, 0.1, 0.0, 0.0])
    assert g.correct == (True, False, False, False)
    assert g.reasons == ("correct", "wrong answer", "no answer found", "truncated")
    assert g.version == 3 and g.problem == PROBLEM


def test_failed_sample_and_raising_verifier_score_zero():
    def flaky(text: str, problem: object, truncated: bool) -> tuple[float, bool, str]:
        if "boom" in text:
            raise RuntimeError("parser exploded")
        return 1.0, True, "correct"

    g = score_group(make_group(["fine", "boom", ""], failures=["", "", "prompt too long"]), flaky)
    assert g.rewards is not None
    assert g.rewards.tolist() == [1.0, 0.0, 0.0]
    assert g.reasons[1] == "verifier raised: RuntimeError: parser exploded"
    assert g.reasons[2] == "generation failed: prompt too long"


def _raising_verifier(text: str, problem: object, truncated: bool) -> tuple[float, bool, str]:
    if text == "boom":
        raise ValueError("bad")
    return (1.0, True, "correct") if text == "Answer: 7" else (0.0, False, "wrong answer")


def test_reward_worker_forwards_groups_and_counts(fresh_groups):
    cluster = fresh_groups
    reward = RewardWorker.launch(cluster, [0], _raising_verifier, name="reward-test")
    inp, out = Channel("reward-test/in"), Channel("reward-test/out")
    inp.put(make_group(["Answer: 7", "boom"]), version=3)
    inp.put(make_group(["Answer: 7", "Answer: 7"]), version=4)
    [metrics] = reward.call(RewardWorker.score, inp, out, 2).wait()
    first, second = out.get_item(timeout=10), out.get_item(timeout=10)
    assert (first.meta.version, second.meta.version) == (3, 4)
    assert first.payload.rewards.tolist() == [1.0, 0.0]
    assert metrics["reward/verifier_errors"] == 1
    assert metrics["reward/mean"] == pytest.approx(0.75)
    assert metrics["reward/accuracy"] == pytest.approx(0.75)
