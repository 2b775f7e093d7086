"""The math task: deterministic disjoint splits, prompts, config checks and the answer verifier."""

from __future__ import annotations

import random
import re

import pytest

from rlinf.config import from_dict
from rlinf.envs.math_task import (
    PRESETS,
    MathProblem,
    MathTaskConfig,
    ScoreResult,
    chat_messages,
    format_prompt,
    make_splits,
    preset,
    score,
    score_problem,
    stated_answer,
    tokenizer_corpus,
)
from rlinf.errors import ConfigError

# ------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("name", list(PRESETS))
def test_splits_are_disjoint_deterministic_and_sized(name):
    cfg = preset(name)
    splits = make_splits(cfg)
    assert make_splits(cfg) == splits
    assert len(splits.eval) == cfg.num_eval
    assert 0 < len(splits.train) <= cfg.num_train
    train_keys = {p.key for p in splits.train}
    eval_keys = {p.key for p in splits.eval}
    assert len(train_keys) == len(splits.train) and len(eval_keys) == len(splits.eval)
    assert not train_keys & eval_keys
    assert not {p.question for p in splits.train} & {p.question for p in splits.eval}


def test_eval_split_does_not_depend_on_train_size_but_on_seed():
    cfg = MathTaskConfig(num_train=50)
    assert make_splits(cfg).eval == make_splits(MathTaskConfig(num_train=500)).eval
    assert make_splits(cfg).eval != make_splits(MathTaskConfig(num_train=50, seed=1)).eval


def test_small_spaces_use_every_problem_once():
    splits = make_splits(preset("add-1d"))  # 10 x 10 problems: 50 eval, the other 50 train
    assert len(splits.train) + len(splits.eval) == 100


def test_arithmetic_answers_are_exact():
    cfg = MathTaskConfig(operations=("add", "sub", "mul"), min_digits=2, max_digits=3, allow_negative=True)
    symbol = {"add": "+", "sub": "-", "mul": "*"}
    for p in make_splits(cfg).eval:
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", p.question).groups()
        assert op == symbol[p.operation]
        assert 10 <= int(a) <= 999 and 10 <= int(b) <= 999
        assert p.answer == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_subtraction_is_non_negative_unless_allowed():
    cfg = MathTaskConfig(operations=("sub",), num_eval=200)
    assert min(p.answer for p in make_splits(cfg).eval) >= 0
    negative = MathTaskConfig(operations=("sub",), num_eval=200, allow_negative=True)
    assert min(p.answer for p in make_splits(negative).eval) < 0


def test_word_problems_have_exact_answers_from_their_numbers():
    for p in make_splits(preset("word-2d")).eval:
        numbers = [int(n) for n in re.findall(r"\d+", p.question)]
        assert p.operation == "word" and p.answer >= 0
        assert p.key.split(":")[1:] == [str(n) for n in numbers]
        # Every template combines its numbers with +, - or *; one of them must give the answer.
        candidates = {numbers[0] + numbers[1], numbers[0] - numbers[1], numbers[0] * numbers[1]}
        if len(numbers) == 3:
            candidates = {numbers[0] + numbers[1] - numbers[2]}
        assert p.answer in candidates, p


def test_hand_checked_word_problem():
    splits = make_splits(MathTaskConfig(operations=("word",), num_eval=400, num_train=1))
    two_step = next(p for p in splits.eval if "gives away" in p.question)
    a, b, c = (int(n) for n in re.findall(r"\d+", two_step.question))
    assert two_step.answer == a + b - c


# ------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"operations": ("add", "divide")}, r"'divide'.*one of"),
        ({"operations": ("ad",)}, r"Did you mean 'add'"),
        ({"operations": "add"}, r"operations='add' is a string.*operations=\('add',\)"),
        ({"operations": ()}, r"operations=\(\) is empty"),
        ({"operations": ("add", "add")}, r"lists an operation twice"),
        ({"min_digits": 0}, r"min_digits=0 must be between 1 and 6"),
        ({"min_digits": 3, "max_digits": 2}, r"max_digits=2 must be between min_digits=3 and 6"),
        ({"num_eval": 0}, r"num_eval=0 must be at least 1"),
        ({"num_train": 0}, r"num_train=0 must be at least 1"),
        ({"format_reward": 1.0}, r"format_reward=1.0 must be in \[0, 1\)"),
        ({"few_shot": 4}, r"few_shot=4 must be between 0 and 3"),
        ({"answer_format": "latex"}, r"answer_format='latex'.*use answer_format='answer'"),
        ({"prompt_style": "raw"}, r"prompt_style='raw'"),
        (
            {"operations": ("add",), "max_digits": 1, "num_eval": 100},
            r"num_eval=100 leaves no train problems.*only 100 distinct.*Lower num_eval to at most 50",
        ),
    ],
)
def test_bad_config_values_name_the_value_and_a_fix(changes, match):
    with pytest.raises(ConfigError, match=match):
        MathTaskConfig(**changes)


def test_config_loads_from_yaml_style_dicts():
    cfg = from_dict(MathTaskConfig, {"operations": ["add", "word"], "max_digits": 1, "num_eval": 10})
    assert cfg.operations == ("add", "word") and cfg.max_digits == 1
    with pytest.raises(ConfigError, match="Did you mean 'num_eval'"):
        from_dict(MathTaskConfig, {"num_evals": 10})


def test_unknown_preset_suggests_a_name():
    with pytest.raises(ConfigError, match="Did you mean 'add-2d'"):
        preset("add-2")


# ------------------------------------------------------------------------------------------ prompts


class _FakeChatTokenizer:
    def apply_chat_template(self, conversation, *, tokenize, add_generation_prompt):
        body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in conversation)
        return body + ("<assistant>" if add_generation_prompt else "")


PROBLEM = MathProblem("What is 2 + 3?", 5, "add", "add:2:3")


def test_plain_prompt_asks_for_the_answer_format():
    plain = format_prompt(PROBLEM, MathTaskConfig(prompt_style="plain", few_shot=0))
    assert plain == (
        'Question: What is 2 + 3?\nSolve it, then give the final number on the last line as "Answer: <number>".\n'
    )
    boxed = format_prompt(PROBLEM, MathTaskConfig(prompt_style="plain", few_shot=0, answer_format="boxed"))
    assert boxed.endswith("put the final number in \\boxed{}.\n")


def test_chat_prompt_has_system_examples_then_the_problem():
    cfg = MathTaskConfig(few_shot=2)
    messages = chat_messages(PROBLEM, cfg)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "Answer: <number>" in messages[0]["content"]
    for reply in (messages[2]["content"], messages[4]["content"]):
        example_answer = int(reply.rsplit(" ", 1)[1])
        assert score(reply, example_answer).correct  # the examples model exactly what is verified
    assert messages[-1]["content"].startswith("What is 2 + 3?\n")
    text = format_prompt(PROBLEM, cfg, _FakeChatTokenizer())
    assert text.startswith("<system>") and text.endswith("</user><assistant>")
    bare = chat_messages(PROBLEM, MathTaskConfig(system_prompt=False, few_shot=0))
    assert [m["role"] for m in bare] == ["user"]


def test_word_tasks_show_the_word_example_first():
    messages = chat_messages(PROBLEM, MathTaskConfig(operations=("word",), few_shot=1))
    assert "beads" in messages[1]["content"]


def test_chat_prompt_without_tokenizer_says_what_to_pass():
    with pytest.raises(ValueError, match="pass the model's tokenizer or set prompt_style='plain'"):
        format_prompt(PROBLEM, MathTaskConfig())


def test_tokenizer_corpus_is_deterministic_text():
    lines = tokenizer_corpus(num_lines=50)
    assert lines == tokenizer_corpus(num_lines=50) and len(lines) == 50
    assert any("\\boxed{" in line for line in lines) and any("Answer: " in line for line in lines)


# ----------------------------------------------------------------------------------------- verifier


@pytest.mark.parametrize(
    ("completion", "answer", "reward", "correct", "reason", "predicted"),
    [
        ("3 + 4 = 7\nAnswer: 7", 7, 1.0, True, "correct", "7"),
        ("3 + 4 = 8\nAnswer: 8", 7, 0.1, False, "wrong answer", "8"),
        ("answer: 7", 7, 1.0, True, "correct", "7"),
        ("**Answer:** 7", 7, 1.0, True, "correct", "7"),
        ("Answer: $7$.", 7, 1.0, True, "correct", "7"),
        ("Answer: 7 apples", 7, 1.0, True, "correct", "7"),
        ("Answer: 3 + 4 = 7", 7, 1.0, True, "correct", "7"),
        ("Answer:\n7", 7, 1.0, True, "correct", "7"),
        ("Answer: 1,234", 1234, 1.0, True, "correct", "1234"),
        ("Answer: 1 234", 1234, 1.0, True, "correct", "1234"),
        ("Answer: 12,345,678.", 12345678, 1.0, True, "correct", "12345678"),
        ("Answer: -12", -12, 1.0, True, "correct", "-12"),
        ("Answer: − 12", -12, 1.0, True, "correct", "-12"),
        ("Answer: -12", 12, 0.1, False, "wrong answer", "-12"),
        ("Answer: 7.0", 7, 1.0, True, "correct", "7"),
        ("Answer: 7.5", 7, 0.1, False, "wrong answer", "7.5"),
        ("Answer: 5\nWait, no.\nAnswer: 7", 7, 1.0, True, "correct", "7"),
        ("Answer: 7\nAnswer: 5", 7, 0.1, False, "wrong answer", "5"),
        ("Answer: 7" + " " * 100 + "and more", 7, 1.0, True, "correct", "7"),
        ("Answer: \\(7\\)", 7, 1.0, True, "correct", "7"),
        ("Answer: " + "1" * 200, 7, 0.0, False, "answer not a number", None),
        ("The answer is 7.", 7, 0.0, False, "no answer found", None),
        ("Answer: seven", 7, 0.0, False, "answer not a number", None),
        ("", 7, 0.0, False, "empty completion", None),
        ("   \n\t", 7, 0.0, False, "empty completion", None),
    ],
)
def test_answer_format_cases_worked_by_hand(completion, answer, reward, correct, reason, predicted):
    assert score(completion, answer) == ScoreResult(
        reward, correct, reason, formatted=predicted is not None, predicted=predicted
    )


@pytest.mark.parametrize(
    ("completion", "answer", "correct", "reason"),
    [
        ("so the sum is \\boxed{7}.", 7, True, "correct"),
        ("\\boxed{ -1,200 }", -1200, True, "correct"),
        ("\\boxed{\\text{7}}", 7, True, "correct"),
        ("\\boxed{5} then \\boxed{7}", 7, True, "correct"),
        ("\\boxed{8}", 7, False, "wrong answer"),
        ("\\boxed{x}", 7, False, "answer not a number"),
        ("\\boxed{7", 7, False, "answer not a number"),
        ("Answer: 7", 7, False, "no answer found"),
    ],
)
def test_boxed_format_cases(completion, answer, correct, reason):
    result = score(completion, answer, answer_format="boxed")
    assert (result.correct, result.reason) == (correct, reason)


def test_truncated_completions_only_count_finished_answers():
    # The last digits may have been cut off, so an answer at the very end is not trusted.
    assert score("Answer: 1", 12, truncated=True).reason == "truncated"
    assert score("I think the sum is", 12, truncated=True).reason == "truncated"
    assert score("Answer:", 12, truncated=True).reason == "truncated"
    finished = score("Answer: 12\nAnd then I kept talk", 12, truncated=True)
    assert finished.correct and finished.reward == 1.0


def test_score_problem_uses_the_config():
    cfg = MathTaskConfig(answer_format="boxed", format_reward=0.25)
    assert score_problem("\\boxed{4}", PROBLEM, cfg).reward == 0.25
    assert score_problem(stated_answer(5, "boxed"), PROBLEM, cfg).correct


def test_verifier_never_raises_and_stays_fast_on_hostile_text():
    rng = random.Random(0)
    alphabet = "Answer:\\boxed{}0123456789-+., $*\n\tx=−"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        for fmt in ("answer", "boxed"):
            result = score(text, 7, answer_format=fmt, truncated=rng.random() < 0.5)
            assert 0.0 <= result.reward <= 1.0 and isinstance(result.reason, str)
    assert score(None, 7).reason == "empty completion"  # type: ignore[arg-type]
    endless = "Answer: " * 100_000 + "1" * 1_000_000 + "{" * 100_000 + "\\boxed{" * 10_000
    assert score(endless, 7, truncated=True).reward == 0.0
    assert score(endless, 7, answer_format="boxed", truncated=True).reward == 0.0
