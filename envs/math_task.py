"""A verifiable math task: generated arithmetic and word problems with exact integer answers.

The task owns three things: the problems (a train split and a disjoint held-out eval split, both
fixed by a seed), the prompt text that asks for a fixed answer format, and the verifier that turns a
completion into a reward. Nothing here touches a model; the tokenizer is passed in where a chat
template is needed.
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args

from rlinf.errors import ConfigError

Operation = Literal["add", "sub", "mul", "word"]
AnswerFormat = Literal["answer", "boxed"]
PromptStyle = Literal["plain", "chat"]

OPERATIONS: tuple[str, ...] = get_args(Operation)
ANSWER_FORMATS: tuple[str, ...] = get_args(AnswerFormat)

# Prompt text. Measured on SmolLM2-135M-Instruct (benchmarks/math_task_baseline.py): with neither a
# system message nor a worked example it almost never uses the requested format; with both it does
# in ~90 % of greedy replies, and "Answer: <n>" is followed more often than \boxed{}.
_INSTRUCTIONS: dict[str, str] = {
    "answer": 'Solve it, then give the final number on the last line as "Answer: <number>".',
    "boxed": "Solve it, then put the final number in \\boxed{}.",
}
_SYSTEM_PROMPTS: dict[str, str] = {
    "answer": "You solve math problems. Always end with the line Answer: <number>.",
    "boxed": "You solve math problems. Always end with the final number in \\boxed{}.",
}
# Worked examples (question, working, answer); their wording and numbers match no template or split.
_EXAMPLES: tuple[tuple[str, str, int], ...] = (
    ("What is 3 + 5?", "3 + 5 = 8", 8),
    ("A jar holds 4 red beads and 6 blue beads. How many beads are in the jar?", "4 + 6 = 10 beads.", 10),
    ("What is 6 * 7?", "6 * 7 = 42", 42),
)


# Above this many distinct arithmetic problems, splits are drawn by rejection sampling instead of
# enumerating and shuffling the whole space.
_ENUMERATE_LIMIT = 50_000


@dataclass(frozen=True)
class MathTaskConfig:
    """Which problems the task generates and how answers are asked for and rewarded.

    Args:
        operations: problem kinds, drawn uniformly: ``add``, ``sub``, ``mul`` (``a op b``) and
            ``word`` (templated one- or two-step word problems).
        min_digits: fewest digits of each operand (1 includes 0).
        max_digits: most digits of each operand.
        allow_negative: ``sub`` may produce negative answers; otherwise the larger operand comes first.
        num_train: size of the train split (capped by how many distinct problems exist).
        num_eval: size of the held-out eval split; no eval problem's numbers appear in train.
        seed: fixes both splits.
        answer_format: ``answer`` asks for a final line ``Answer: <n>``; ``boxed`` for ``\\boxed{n}``.
        format_reward: reward for a well-formed but wrong answer (a correct one gets 1.0).
        prompt_style: ``chat`` renders the model's chat template; ``plain`` is ``Question: ...`` text
            for models without one.
        system_prompt: start chat prompts with a system message that restates the answer format
            (otherwise the model's own default system message, if any, applies).
        few_shot: worked examples shown before the problem (0 to 3); they are fixed texts, never
            drawn from either split.
    """

    operations: tuple[Operation, ...] = ("add", "sub")
    min_digits: int = 1
    max_digits: int = 2
    allow_negative: bool = False
    num_train: int = 2000
    num_eval: int = 100
    seed: int = 0
    answer_format: AnswerFormat = "answer"
    format_reward: float = 0.1
    prompt_style: PromptStyle = "chat"
    system_prompt: bool = True
    few_shot: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.operations, str):
            raise ConfigError(
                f"operations={self.operations!r} is a string; it must be a tuple of operations, "
                f"e.g. operations=({self.operations!r},)."
            )
        if not self.operations:
            raise ConfigError(f"operations=() is empty; pick at least one of {list(OPERATIONS)}.")
        for op in self.operations:
            if op not in OPERATIONS:
                near = difflib.get_close_matches(str(op), OPERATIONS, n=1)
                hint = f" Did you mean {near[0]!r}?" if near else ""
                raise ConfigError(f"operations contains {op!r}, which is not one of {list(OPERATIONS)}.{hint}")
        if len(set(self.operations)) != len(self.operations):
            raise ConfigError(
                f"operations={self.operations!r} lists an operation twice; list each once "
                f"(they are drawn uniformly), e.g. {tuple(dict.fromkeys(self.operations))!r}."
            )
        if not 1 <= self.min_digits <= 6:
            raise ConfigError(f"min_digits={self.min_digits} must be between 1 and 6; try min_digits=1.")
        if not self.min_digits <= self.max_digits <= 6:
            raise ConfigError(
                f"max_digits={self.max_digits} must be between min_digits={self.min_digits} and 6; "
                f"try max_digits={max(self.min_digits, min(self.max_digits, 6))}."
            )
        if self.num_train < 1:
            raise ConfigError(f"num_train={self.num_train} must be at least 1; try num_train=2000.")
        if self.num_eval < 1:
            raise ConfigError(f"num_eval={self.num_eval} must be at least 1; try num_eval=100.")
        if self.answer_format not in ANSWER_FORMATS:
            raise ConfigError(
                f"answer_format={self.answer_format!r} is not one of {list(ANSWER_FORMATS)}; "
                f"use answer_format='answer'."
            )
        if not 0.0 <= self.format_reward < 1.0:
            raise ConfigError(
                f"format_reward={self.format_reward} must be in [0, 1) so a correct answer (1.0) "
                f"always beats a merely well-formed one; try format_reward=0.1."
            )
        if self.prompt_style not in ("plain", "chat"):
            raise ConfigError(
                f"prompt_style={self.prompt_style!r} is not 'plain' or 'chat'; use 'chat' for an instruct model."
            )
        if not 0 <= self.few_shot <= len(_EXAMPLES):
            raise ConfigError(
                f"few_shot={self.few_shot} must be between 0 and {len(_EXAMPLES)} (the number of worked "
                f"examples); try few_shot=1."
            )
        space = self.arithmetic_space
        if space is not None and space <= self.num_eval:
            raise ConfigError(
                f"num_eval={self.num_eval} leaves no train problems: operations={self.operations!r} with "
                f"{self.min_digits}..{self.max_digits} digits have only {space} distinct problems. "
                f"Lower num_eval to at most {max(1, space // 2)} or raise max_digits."
            )

    @property
    def operand_range(self) -> tuple[int, int]:
        """Smallest and largest operand, inclusive."""
        low = 0 if self.min_digits == 1 else 10 ** (self.min_digits - 1)
        return low, 10**self.max_digits - 1

    @property
    def arithmetic_space(self) -> int | None:
        """How many distinct problems exist, or None when word problems make it effectively unbounded."""
        if "word" in self.operations:
            return None
        low, high = self.operand_range
        n = high - low + 1
        total = 0
        for op in self.operations:
            total += n * (n + 1) // 2 if op == "sub" and not self.allow_negative else n * n
        return total


PRESETS: dict[str, MathTaskConfig] = {
    "add-1d": MathTaskConfig(operations=("add",), min_digits=1, max_digits=1, num_eval=50),
    "add-2d": MathTaskConfig(operations=("add",), min_digits=1, max_digits=2),
    "addsub-2d": MathTaskConfig(operations=("add", "sub"), min_digits=1, max_digits=2),
    "addsub-3d": MathTaskConfig(operations=("add", "sub"), min_digits=2, max_digits=3),
    "mul-1d": MathTaskConfig(operations=("mul",), min_digits=1, max_digits=1, num_eval=50),
    "mul-2d": MathTaskConfig(operations=("mul",), min_digits=1, max_digits=2),
    "word-1d": MathTaskConfig(operations=("word",), min_digits=1, max_digits=1),
    "word-2d": MathTaskConfig(operations=("word",), min_digits=1, max_digits=2),
}


def preset(name: str) -> MathTaskConfig:
    """Returns a named difficulty setting from ``PRESETS`` (e.g. ``"addsub-2d"``)."""
    if name not in PRESETS:
        near = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"unknown math task preset {name!r}.{hint} Known presets: {', '.join(PRESETS)}.")
    return PRESETS[name]


# ----------------------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class MathProblem:
    """One problem.

    Args:
        question: the problem text, without any answer-format instruction.
        answer: the exact integer answer.
        operation: the kind it was drawn from (``add``, ``sub``, ``mul``, ``word``).
        key: identifies the underlying numbers and structure; splits are disjoint on it.
    """

    question: str
    answer: int
    operation: str
    key: str


@dataclass(frozen=True)
class MathSplits:
    """The train and held-out eval problems of one config."""

    train: tuple[MathProblem, ...]
    eval: tuple[MathProblem, ...]
    config: MathTaskConfig = field(repr=False)


_ARITHMETIC_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}


def _arithmetic(op: str, a: int, b: int) -> MathProblem:
    value = a + b if op == "add" else a - b if op == "sub" else a * b
    return MathProblem(
        question=f"What is {a} {_ARITHMETIC_SYMBOL[op]} {b}?",
        answer=value,
        operation=op,
        key=f"{op}:{a}:{b}",
    )


@dataclass(frozen=True)
class _WordTemplate:
    text: str  # str.format fields: name, they, item, a, b, c
    arity: int
    solve: Callable[[int, int, int], int]
    valid: Callable[[int, int, int], bool]


def _always(a: int, b: int, c: int) -> bool:
    return True


_WORD_TEMPLATES: tuple[_WordTemplate, ...] = (
    _WordTemplate(
        "{name} has {a} {item}. {they} finds {b} more. How many {item} does {name} have now?",
        2,
        lambda a, b, c: a + b,
        _always,
    ),
    _WordTemplate(
        "{name} had {a} {item} and gave {b} of them to a friend. How many {item} does {name} have left?",
        2,
        lambda a, b, c: a - b,
        lambda a, b, c: a >= b,
    ),
    _WordTemplate(
        "There are {a} boxes with {b} {item} in each box. How many {item} are there in all?",
        2,
        lambda a, b, c: a * b,
        _always,
    ),
    _WordTemplate(
        "{name} counted {a} {item} in the morning and {b} {item} in the afternoon. "
        "How many {item} did {name} count that day?",
        2,
        lambda a, b, c: a + b,
        _always,
    ),
    _WordTemplate(
        "A shop had {a} {item} and sold {b} of them. How many {item} does the shop still have?",
        2,
        lambda a, b, c: a - b,
        lambda a, b, c: a >= b,
    ),
    _WordTemplate(
        "{name} has {a} {item}. {they} gets {b} more and then gives away {c}. "
        "How many {item} does {name} have at the end?",
        3,
        lambda a, b, c: a + b - c,
        lambda a, b, c: a + b >= c,
    ),
    _WordTemplate(
        "{name} and a friend each have {a} {item}. The friend gives {name} {b} more. "
        "How many {item} does {name} have now?",
        2,
        lambda a, b, c: a + b,
        lambda a, b, c: b <= a,
    ),
)

_NAMES: tuple[tuple[str, str], ...] = (
    ("Ana", "She"),
    ("Ben", "He"),
    ("Mia", "She"),
    ("Sam", "He"),
    ("Leo", "He"),
    ("Zoe", "She"),
    ("Omar", "He"),
    ("Lily", "She"),
)
_ITEMS: tuple[str, ...] = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "cards", "coins")


def _word_problem(rng: random.Random, low: int, high: int) -> MathProblem:
    # Word problems avoid 0 and 1 so every count reads naturally in the plural.
    low = max(low, 2)
    index = rng.randrange(len(_WORD_TEMPLATES))
    template = _WORD_TEMPLATES[index]
    while True:
        a, b, c = (rng.randint(low, high) for _ in range(3))
        if template.arity < 3:
            c = 0
        if template.valid(a, b, c):
            break
    name, they = _NAMES[rng.randrange(len(_NAMES))]
    item = _ITEMS[rng.randrange(len(_ITEMS))]
    numbers = ":".join(str(v) for v in (a, b, c)[: template.arity])
    return MathProblem(
        question=template.text.format(name=name, they=they, item=item, a=a, b=b, c=c),
        answer=template.solve(a, b, c),
        operation="word",
        key=f"word{index}:{numbers}",
    )


def _draw(op: str, rng: random.Random, cfg: MathTaskConfig) -> MathProblem:
    low, high = cfg.operand_range
    if op == "word":
        return _word_problem(rng, low, high)
    a, b = rng.randint(low, high), rng.randint(low, high)
    if op == "sub" and not cfg.allow_negative and a < b:
        a, b = b, a
    return _arithmetic(op, a, b)


def _enumerate(cfg: MathTaskConfig) -> list[MathProblem]:
    low, high = cfg.operand_range
    out = []
    for op in cfg.operations:
        for a in range(low, high + 1):
            for b in range(low, high + 1):
                if op == "sub" and not cfg.allow_negative and a < b:
                    continue
                out.append(_arithmetic(op, a, b))
    return out


def make_splits(cfg: MathTaskConfig) -> MathSplits:
    """Generates the train and eval splits of ``cfg``; the same config always gives the same splits.

    The eval split is drawn first, so it does not change when ``num_train`` does.
    """
    rng = random.Random(f"rlinf-math-{cfg.seed}")
    wanted = cfg.num_eval + cfg.num_train
    space = cfg.arithmetic_space
    if space is not None and space <= _ENUMERATE_LIMIT:
        pool = _enumerate(cfg)
        rng.shuffle(pool)
        pool = pool[:wanted]
    else:
        pool, seen = [], set()
        attempts = 0
        max_attempts = 20 * wanted + 1000
        while len(pool) < wanted and attempts < max_attempts:
            attempts += 1
            problem = _draw(cfg.operations[rng.randrange(len(cfg.operations))], rng, cfg)
            if problem.key not in seen:
                seen.add(problem.key)
                pool.append(problem)
    if len(pool) <= cfg.num_eval:
        raise ConfigError(
            f"num_eval={cfg.num_eval} leaves no train problems: only {len(pool)} distinct problems were "
            f"found for operations={cfg.operations!r} with {cfg.min_digits}..{cfg.max_digits} digits. "
            f"Lower num_eval or raise max_digits."
        )
    return MathSplits(train=tuple(pool[cfg.num_eval :]), eval=tuple(pool[: cfg.num_eval]), config=cfg)


# ------------------------------------------------------------------------------------------ prompts


class ChatTokenizer(Protocol):
    """The part of a Hugging Face tokenizer that chat prompts need."""

    def apply_chat_template(self, conversation: Any, *, tokenize: bool, add_generation_prompt: bool) -> Any: ...


def instruction(answer_format: str = "answer") -> str:
    """The sentence that tells the model how to state its final answer."""
    if answer_format not in _INSTRUCTIONS:
        raise ConfigError(
            f"answer_format={answer_format!r} is not one of {list(_INSTRUCTIONS)}; use answer_format='answer'."
        )
    return _INSTRUCTIONS[answer_format]


def stated_answer(answer: int, answer_format: str = "answer") -> str:
    """The final line that states ``answer`` in ``answer_format`` (what the verifier looks for)."""
    instruction(answer_format)
    return f"Answer: {answer}" if answer_format == "answer" else f"\\boxed{{{answer}}}"


def _examples(cfg: MathTaskConfig) -> list[tuple[str, str]]:
    """The first ``few_shot`` worked examples as (user message, assistant reply); word problems first."""
    order = [1, 0, 2] if "word" in cfg.operations else [0, 2, 1]
    out = []
    for index in order[: cfg.few_shot]:
        question, working, answer = _EXAMPLES[index]
        reply = f"{working}\n{stated_answer(answer, cfg.answer_format)}"
        out.append((f"{question}\n{instruction(cfg.answer_format)}", reply))
    return out


def chat_messages(problem: MathProblem, cfg: MathTaskConfig) -> list[dict[str, str]]:
    """The problem as chat messages: optional system message, worked examples, then the problem."""
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": _SYSTEM_PROMPTS[cfg.answer_format]})
    for user, assistant in _examples(cfg):
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    messages.append({"role": "user", "content": f"{problem.question}\n{instruction(cfg.answer_format)}"})
    return messages


def format_prompt(problem: MathProblem, cfg: MathTaskConfig, tokenizer: ChatTokenizer | None = None) -> str:
    """The prompt text for one problem, in ``cfg.prompt_style``.

    Args:
        problem: the problem to ask.
        cfg: answer format, prompt style, system prompt and number of worked examples.
        tokenizer: the model's tokenizer; needed for ``prompt_style="chat"``.
    """
    if cfg.prompt_style == "plain":
        shots = "".join(f"Question: {user}\n{reply}\n\n" for user, reply in _examples(cfg))
        return f"{shots}Question: {problem.question}\n{instruction(cfg.answer_format)}\n"
    if tokenizer is None:
        raise ValueError(
            "prompt_style='chat' renders the tokenizer's chat template, but tokenizer=None; pass the "
            "model's tokenizer or set prompt_style='plain'."
        )
    messages = chat_messages(problem, cfg)
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


# ----------------------------------------------------------------------------------------- verifier


@dataclass(frozen=True)
class ScoreResult:
    """The verdict on one completion.

    Args:
        reward: 1.0 when correct, the format reward for a well-formed wrong answer, else 0.0.
        correct: the final answer equals the reference answer.
        reason: ``correct``, ``wrong answer``, ``no answer found``, ``answer not a number``,
            ``empty completion`` or ``truncated``.
        formatted: the completion stated a number in the requested answer format.
        predicted: the extracted final answer (normalised text), or None.
    """

    reward: float
    correct: bool
    reason: str
    formatted: bool = False
    predicted: str | None = None


# Quantifiers are bounded so very long or adversarial completions stay linear to scan.
_ANSWER_MARKER = re.compile(r"answer[ \t]{0,3}\*{0,2}[ \t]{0,3}[:：]", re.IGNORECASE)
_BOXED_MARKER = re.compile(r"\\boxed[ \t]{0,3}\{")
_NUMBER = re.compile(r"[-+−]?[ \t]?(?:\d{1,3}(?:[, ]\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_DECORATION = re.compile(r"[*$`]|\\[()\[\]]|\\text\{|\\mathbf\{|\\!|\\,")
_SNIPPET_CHARS = 80


def _snippet_after(text: str, start: int) -> tuple[str, int]:
    """The first non-empty line after a marker (at most ``_SNIPPET_CHARS`` long) and where it ends."""
    window = text[start : start + _SNIPPET_CHARS]
    begin = len(window) - len(window.lstrip())
    line = window[begin:].split("\n", 1)[0]
    return line, start + begin + len(line)


def _boxed_content(text: str, start: int) -> str | None:
    depth, end = 1, start
    limit = min(len(text), start + _SNIPPET_CHARS)
    while end < limit:
        char = text[end]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:end]
        end += 1
    return None


def _parse_number(snippet: str) -> tuple[str | None, int]:
    """Returns the normalised number in ``snippet`` and where it ends (-1 when there is none)."""
    cleaned = _DECORATION.sub(lambda m: " " * len(m.group(0)), snippet)  # keeps offsets aligned
    offset = 0
    if "=" in cleaned:
        offset = cleaned.rindex("=") + 1
    match = _NUMBER.search(cleaned, offset)
    if match is None:
        return None, -1
    raw = match.group(0).replace("−", "-").replace(",", "").replace(" ", "").replace("\t", "")
    raw = raw.lstrip("+")
    if "." in raw:
        whole, frac = raw.split(".", 1)
        raw = whole if frac.strip("0") == "" else raw
    if raw in ("-0", ""):
        raw = "0"
    return raw, match.end()


def score(
    completion: str,
    answer: int,
    *,
    answer_format: str = "answer",
    format_reward: float = 0.1,
    truncated: bool = False,
) -> ScoreResult:
    """Scores one completion against the exact integer answer; never raises on bad completions.

    The last answer marker wins (``Answer: <n>`` or ``\\boxed{n}``, per ``answer_format``); commas,
    spaces as thousands separators, markdown/LaTeX decoration, a trailing period and negative numbers
    are tolerated. ``Answer: 3 + 4 = 7`` reads as 7 (the part after the last ``=``).

    Args:
        completion: the generated text (prompt excluded).
        answer: the reference answer.
        answer_format: ``answer`` or ``boxed``.
        format_reward: reward for a well-formed wrong answer.
        truncated: generation hit its token limit; an answer that runs into the cut is not trusted.
    """
    if not isinstance(completion, str) or not completion.strip():
        return ScoreResult(0.0, False, "empty completion")
    if answer_format not in _INSTRUCTIONS:
        raise ValueError(
            f"answer_format={answer_format!r} is not one of {list(_INSTRUCTIONS)}; use answer_format='answer'."
        )
    snippet: str | None = None
    snippet_end = 0
    if answer_format == "answer":
        last = None
        for match in _ANSWER_MARKER.finditer(completion):
            last = match
        if last is not None:
            start = last.end()
            snippet, snippet_end = _snippet_after(completion, start)
    else:
        starts = [m.end() for m in _BOXED_MARKER.finditer(completion)]
        for start in reversed(starts):
            content = _boxed_content(completion, start)
            if content is not None:
                snippet, snippet_end = content, start + len(content)  # at the closing brace
                break
        if snippet is None and starts:
            return ScoreResult(0.0, False, "truncated" if truncated else "answer not a number")
    if snippet is None:
        return ScoreResult(0.0, False, "truncated" if truncated else "no answer found")
    predicted, number_end = _parse_number(snippet)
    if predicted is None:
        reason = "truncated" if truncated and not snippet.strip() else "answer not a number"
        return ScoreResult(0.0, False, reason)
    if number_end >= len(snippet) and snippet_end < len(completion) and completion[snippet_end] not in "\n}":
        # The line ran past the scan window: the number is longer than any answer should be.
        return ScoreResult(0.0, False, "answer not a number")
    # With a cut completion, a number touching the very end may be missing digits.
    if truncated and number_end >= len(snippet.rstrip()) and snippet_end >= len(completion.rstrip()):
        return ScoreResult(0.0, False, "truncated", formatted=True, predicted=predicted)
    if predicted == str(answer):
        return ScoreResult(1.0, True, "correct", formatted=True, predicted=predicted)
    return ScoreResult(format_reward, False, "wrong answer", formatted=True, predicted=predicted)


def score_problem(completion: str, problem: MathProblem, cfg: MathTaskConfig, truncated: bool = False) -> ScoreResult:
    """``score`` with the answer, format and format reward taken from a problem and its config."""
    return score(
        completion,
        problem.answer,
        answer_format=cfg.answer_format,
        format_reward=cfg.format_reward,
        truncated=truncated,
    )


def tokenizer_corpus(num_lines: int = 2000, seed: int = 0) -> list[str]:
    """Text for training a small tokenizer: prompts and answers of every operation in both formats."""
    cfg = MathTaskConfig(
        operations=("add", "sub", "mul", "word"), min_digits=1, max_digits=3, num_train=num_lines, seed=seed
    )
    prompt_cfgs = [
        MathTaskConfig(answer_format="answer", prompt_style="plain", few_shot=0),
        MathTaskConfig(answer_format="boxed", prompt_style="plain", few_shot=0),
    ]
    lines: list[str] = []
    for i, problem in enumerate(make_splits(cfg).train):
        prompt_cfg = prompt_cfgs[i % len(prompt_cfgs)]
        stated = stated_answer(problem.answer, prompt_cfg.answer_format)
        lines.append(format_prompt(problem, prompt_cfg) + f"The result is {problem.answer}.\n{stated}")
    return lines
